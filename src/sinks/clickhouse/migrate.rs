//! The ClickHouse schema: the files under `migrations/clickhouse`, applied in order once each
//! and recorded in the database's `appliance_migrations` table.
//!
//! Owns: the list of migrations and applying the ones a database lacks.
//! Must never: apply a migration twice, or skip one (they are numbered without gaps).

use clickhouse::Client;

/// The migrations, by number, as their files hold them.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[(
    1,
    "events_persons_groups",
    include_str!("../../../migrations/clickhouse/V1__events_persons_groups.sql"),
)];

/// The statements of a migration file: comment lines dropped, split at each `;`.
pub fn statements(sql: &str) -> Vec<String> {
    let code: String = sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .map(|line| format!("{line}\n"))
        .collect();
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Creates the database if needed and applies the migrations it lacks; returns how many.
pub async fn apply(client: &Client, database: &str) -> Result<usize, clickhouse::error::Error> {
    client
        .clone()
        .with_database("default")
        .query("CREATE DATABASE IF NOT EXISTS ?")
        .bind(clickhouse::sql::Identifier(database))
        .execute()
        .await?;
    client
        .query(
            "CREATE TABLE IF NOT EXISTS appliance_migrations
             (version UInt32, name String, applied_at DateTime('UTC'))
             ENGINE = MergeTree ORDER BY version",
        )
        .execute()
        .await?;
    let done: Vec<u32> = client
        .query("SELECT version FROM appliance_migrations")
        .fetch_all()
        .await?;
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        for statement in statements(sql) {
            client.query(&statement).execute().await?;
        }
        client
            .query("INSERT INTO appliance_migrations VALUES (?, ?, now())")
            .bind(*version)
            .bind(*name)
            .execute()
            .await?;
        applied += 1;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_under_migrations_clickhouse_is_listed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/clickhouse");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|(v, name, _)| format!("V{v}__{name}.sql"))
            .collect();
        assert_eq!(files, listed);
        assert!(MIGRATIONS
            .iter()
            .enumerate()
            .all(|(i, m)| m.0 == i as u32 + 1));
    }

    #[test]
    fn statements_split_at_semicolons_outside_comments() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (x UInt8) ENGINE = Log;\n\nCREATE TABLE b (y UInt8) ENGINE = Log;\n";
        let parts = statements(sql);
        assert_eq!(parts.len(), 2);
        assert!(parts[0].starts_with("CREATE TABLE a"));
        assert_eq!(statements(MIGRATIONS[0].2).len(), 4);
    }
}
