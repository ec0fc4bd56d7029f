#!/usr/bin/env bash
# Facematch must open no outbound connection (R9). This check fails when the
# facematch crate (its normal, non-test dependency tree, resolved for that
# crate alone) contains an HTTP / gRPC / telemetry / cache client crate or a
# mesh crate that holds one, or when its source uses a client or opens a
# socket. The network-namespace test shows the same at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
forbidden='^(opentelemetry-otlp|opentelemetry-http|reqwest|ureq|isahc|surf|curl|attohttpc|hyper-tls|hyper-rustls|redis|lettre|estate-runtime|estate-bus|estate-gate|estate-consent|estate-identity|estate-credentials|estate-audit)$'
deps="$(cargo tree -p estate-facematch -e normal --prefix none --locked --offline 2>/dev/null | awk '{print $1}' | sort -u)"
[ -n "$deps" ] || { echo "cargo tree printed nothing for estate-facematch" >&2; exit 1; }
bad="$(grep -E "$forbidden" <<<"$deps" || true)"
if [ -n "$bad" ]; then
  echo "facematch depends on client crates (R9 forbids egress):" >&2
  echo "$bad" >&2
  cargo tree -p estate-facematch -e normal --locked --offline -i "$(head -n1 <<<"$bad")" >&2 || true
  exit 1
fi
uses="$(grep -n -E '_client::|Endpoint::|transport::Channel|TcpStream::connect|UdpSocket|connect_lazy|reqwest|ureq' services/facematch/src -r || true)"
if [ -n "$uses" ]; then
  echo "facematch source uses a network client:" >&2
  echo "$uses" >&2
  exit 1
fi
echo "facematch: $(wc -l <<<"$deps") crates, no network client"
