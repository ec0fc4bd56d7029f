//! RED metrics (issue: distributed, point 3): the Prometheus endpoint counts
//! calls per method by status code and times them.

mod support;

use estate_proto::gate::{DecideRequest, decide_request};
use estate_proto::identity::ListEstatesRequest;
use estate_test_support::TestMesh;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn every_rpc_is_counted_by_code_and_timed() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn_with(|s| s.metrics.listen = Some(([127, 0, 0, 1], 0).into())).await?;
    let port = mesh.metrics_port.ok_or_else(|| anyhow::anyhow!("no metrics endpoint"))?;
    let w = world(&mesh, "Metrics", "120101").await?;
    let mut g = mesh.gate(&gate(&mesh, &w)?)?;
    let card = |uid: &str| DecideRequest {
        presented: Some(decide_request::Presented::Card(estate_proto::credentials::PresentedCard {
            uid: uid.into(),
            facility_code: String::new(),
        })),
        gate_id: String::new(),
    };
    for _ in 0..3 {
        g.decide(card("04A1B2C3")).await?;
    }
    // Errors: bad input, and no token at all.
    assert!(g.decide(card("zz")).await.is_err());
    assert!(mesh.identity_anonymous().list_estates(ListEstatesRequest::default()).await.is_err());

    let text = scrape(port, "/metrics").await?;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let decide = "/estate.gate.v1.GateService/Decide";
    assert!(value(&text, &format!("estate_rpc_requests_total{{method=\"{decide}\",code=\"OK\"}}")) >= 3, "{text}");
    assert!(value(&text, &format!("estate_rpc_requests_total{{method=\"{decide}\",code=\"INVALID_ARGUMENT\"}}")) >= 1);
    let list = "/estate.identity.v1.IdentityService/ListEstates";
    assert!(value(&text, &format!("estate_rpc_requests_total{{method=\"{list}\",code=\"UNAUTHENTICATED\"}}")) >= 1);
    assert!(value(&text, &format!("estate_rpc_duration_seconds_count{{method=\"{decide}\"}}")) >= 4);
    assert!(value(&text, &format!("estate_rpc_duration_seconds_bucket{{method=\"{decide}\",le=\"+Inf\"}}")) >= 4);
    assert!(text.contains(&format!("estate_rpc_in_flight{{method=\"{decide}\"}} 0")), "{text}");
    assert!(scrape(port, "/other").await?.starts_with("HTTP/1.1 404"));
    mesh.stop().await
}
