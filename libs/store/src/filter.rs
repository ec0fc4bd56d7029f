//! A small WHERE-clause builder for list queries: string binds only, `$n`
//! placeholders (portable between SQLite and PostgreSQL), column names from
//! code, never from requests.

use crate::page::Page;
use sqlx::{Any, AssertSqlSafe};

/// WHERE clauses and their string binds, in placeholder order.
#[derive(Debug, Default)]
pub struct Filter {
    clauses: Vec<String>,
    binds: Vec<String>,
}

impl Filter {
    /// `column = value`.
    pub fn eq(&mut self, column: &'static str, value: &str) -> &mut Self {
        self.binds.push(value.to_owned());
        self.clauses.push(format!("{column} = ${}", self.binds.len()));
        self
    }

    /// `column = value` when value is not empty.
    pub fn eq_if(&mut self, column: &'static str, value: &str) -> &mut Self {
        if !value.is_empty() {
            self.eq(column, value);
        }
        self
    }

    /// `column IN (values)`; no values matches nothing.
    pub fn one_of(&mut self, column: &'static str, values: &[String]) -> &mut Self {
        if values.is_empty() {
            self.clauses.push("1 = 0".to_owned());
            return self;
        }
        let mut marks = Vec::with_capacity(values.len());
        for v in values {
            self.binds.push(v.clone());
            marks.push(format!("${}", self.binds.len()));
        }
        self.clauses.push(format!("{column} IN ({})", marks.join(", ")));
        self
    }

    /// `column LIKE p1% OR …`; no prefixes matches nothing.
    pub fn prefix_of_any(&mut self, column: &'static str, prefixes: &[String]) -> &mut Self {
        if prefixes.is_empty() {
            self.clauses.push("1 = 0".to_owned());
            return self;
        }
        let mut parts = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            self.binds.push(format!("{p}%"));
            parts.push(format!("{column} LIKE ${}", self.binds.len()));
        }
        self.clauses.push(format!("({})", parts.join(" OR ")));
        self
    }

    /// `column IN (select_prefix IN (values))`, e.g. credentials bound to
    /// some estates; `select_prefix` is written in code. No values matches nothing.
    pub fn in_select(&mut self, column: &'static str, select_prefix: &'static str, values: &[String]) -> &mut Self {
        if values.is_empty() {
            self.clauses.push("1 = 0".to_owned());
            return self;
        }
        let mut marks = Vec::with_capacity(values.len());
        for v in values {
            self.binds.push(v.clone());
            marks.push(format!("${}", self.binds.len()));
        }
        self.clauses.push(format!("{column} IN ({select_prefix} IN ({}))", marks.join(", ")));
        self
    }

    /// A fixed clause written in code.
    pub fn raw(&mut self, clause: &'static str) -> &mut Self {
        self.clauses.push(clause.to_owned());
        self
    }

    /// `SELECT {columns} FROM {table} WHERE … AND id > after ORDER BY id LIMIT n+1`.
    pub fn page_sql(mut self, columns: &'static str, table: &'static str, page: &Page) -> (String, Vec<String>) {
        if !page.after_id.is_empty() {
            self.binds.push(page.after_id.clone());
            self.clauses.push(format!("id > ${}", self.binds.len()));
        }
        let where_sql =
            if self.clauses.is_empty() { String::new() } else { format!(" WHERE {}", self.clauses.join(" AND ")) };
        (format!("SELECT {columns} FROM {table}{where_sql} ORDER BY id LIMIT {}", page.fetch_limit()), self.binds)
    }
}

/// Runs a list query built by [`Filter::page_sql`].
pub async fn fetch_page<R>(pool: &sqlx::AnyPool, sql: String, binds: Vec<String>) -> Result<Vec<R>, sqlx::Error>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
{
    let mut q = sqlx::query_as::<Any, R>(AssertSqlSafe(sql));
    for b in binds {
        q = q.bind(b);
    }
    q.fetch_all(pool).await
}
