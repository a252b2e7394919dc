//! The daemon's state in SQLite: instances, their snapshots and image
//! aliases. Schema changes are numbered migrations (`PRAGMA user_version`);
//! every change of state is one transaction, so a killed daemon leaves
//! either the old or the new row, never half of one.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored JSON column did not parse.
    #[error("state database: bad stored {what}: {source}")]
    Json {
        /// Which column.
        what: &'static str,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The database was written by a newer skiffd.
    #[error("state database schema {found} is newer than this skiffd knows ({known}); upgrade skiffd")]
    TooNew {
        /// Its version.
        found: i64,
        /// Ours.
        known: i64,
    },
}

/// Schema migrations, in order; entry N brings the schema to version N+1.
const MIGRATIONS: &[&str] = &[
    // 1: instances, snapshots, image aliases.
    "CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        status TEXT NOT NULL,
        config TEXT NOT NULL,
        devices TEXT NOT NULL,
        ephemeral INTEGER NOT NULL,
        description TEXT NOT NULL,
        image TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_used_at TEXT NOT NULL
     );
     CREATE TABLE snapshots (
        instance TEXT NOT NULL REFERENCES instances(name) ON DELETE CASCADE ON UPDATE CASCADE,
        name TEXT NOT NULL,
        created_at TEXT NOT NULL,
        config TEXT NOT NULL,
        PRIMARY KEY (instance, name)
     );
     CREATE TABLE image_aliases (
        name TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        description TEXT NOT NULL
     );",
];

/// The stored lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Being created: the image and volume may be half-made. A daemon that
    /// starts and finds this removes the instance.
    Creating,
    /// Not running.
    Stopped,
    /// Running (as far as the daemon knows; reconciled at start).
    Running,
    /// Running but paused.
    Frozen,
    /// Its VM ended unexpectedly, or starting failed.
    Error,
}

impl Status {
    /// Whether its VM exists (running or paused).
    pub fn is_up(self) -> bool {
        matches!(self, Status::Running | Status::Frozen)
    }

    fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "Creating",
            Status::Stopped => "Stopped",
            Status::Running => "Running",
            Status::Frozen => "Frozen",
            Status::Error => "Error",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "Creating" => Status::Creating,
            "Running" => Status::Running,
            "Frozen" => Status::Frozen,
            "Error" => Status::Error,
            _ => Status::Stopped,
        }
    }
}

/// One instance's row.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    /// Unique name.
    pub name: String,
    /// Stable UUID (`volatile.uuid`).
    pub id: String,
    /// `virtual-machine` or `container`.
    pub kind: String,
    /// Lifecycle state.
    pub status: Status,
    /// Its own config (incl. `volatile.*`).
    pub config: BTreeMap<String, String>,
    /// Its own devices.
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    /// Deleted when stopped.
    pub ephemeral: bool,
    /// Free text.
    pub description: String,
    /// The image's fingerprint (manifest hex).
    pub image: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub last_used_at: String,
}

/// One snapshot's row.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    /// Its name.
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    /// The instance's config when it was taken.
    pub config: BTreeMap<String, String>,
}

/// The open database.
pub struct Db {
    conn: Connection,
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

fn from_json<T: for<'de> Deserialize<'de>>(what: &'static str, s: &str) -> Result<T, DbError> {
    serde_json::from_str(s).map_err(|source| DbError::Json { what, source })
}

const COLUMNS: &str =
    "name, id, type, status, config, devices, ephemeral, description, image, created_at, last_used_at";

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<(InstanceRow, String, String)> {
    Ok((
        InstanceRow {
            name: r.get(0)?,
            id: r.get(1)?,
            kind: r.get(2)?,
            status: Status::parse(&r.get::<_, String>(3)?),
            config: BTreeMap::new(),
            devices: BTreeMap::new(),
            ephemeral: r.get::<_, i64>(6)? != 0,
            description: r.get(7)?,
            image: r.get(8)?,
            created_at: r.get(9)?,
            last_used_at: r.get(10)?,
        },
        r.get(4)?,
        r.get(5)?,
    ))
}

fn finish((mut row, config, devices): (InstanceRow, String, String)) -> Result<InstanceRow, DbError> {
    row.config = from_json("config", &config)?;
    row.devices = from_json("devices", &devices)?;
    Ok(row)
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    fn init(mut conn: Connection) -> Result<Db, DbError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(DbError::TooNew { found: version, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(Db { conn })
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`.
    pub fn tx<T, E: From<DbError>>(&mut self, f: impl FnOnce(&Transaction<'_>) -> Result<T, E>) -> Result<T, E> {
        let tx = self.conn.transaction().map_err(DbError::from)?;
        let v = f(&tx)?;
        tx.commit().map_err(DbError::from)?;
        Ok(v)
    }

    /// All instances, by name.
    pub fn instances(&self) -> Result<Vec<InstanceRow>, DbError> {
        let mut st = self.conn.prepare(&format!("SELECT {COLUMNS} FROM instances ORDER BY name"))?;
        let rows = st.query_map([], row_of)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(finish).collect()
    }

    /// One instance.
    pub fn instance(&self, name: &str) -> Result<Option<InstanceRow>, DbError> {
        let mut st = self.conn.prepare(&format!("SELECT {COLUMNS} FROM instances WHERE name = ?1"))?;
        st.query_row([name], row_of).optional()?.map(finish).transpose()
    }

    /// The snapshots of an instance, oldest first.
    pub fn snapshots(&self, instance: &str) -> Result<Vec<SnapshotRow>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT name, created_at, config FROM snapshots WHERE instance = ?1 ORDER BY created_at, name")?;
        let rows = st
            .query_map([instance], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(name, created_at, c)| Ok(SnapshotRow { name, created_at, config: from_json("config", &c)? }))
            .collect()
    }

    /// Image aliases: name → (target fingerprint, description).
    pub fn aliases(&self) -> Result<BTreeMap<String, (String, String)>, DbError> {
        let mut st = self.conn.prepare("SELECT name, target, description FROM image_aliases ORDER BY name")?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get::<_, String>(1)?, r.get::<_, String>(2)?))))?
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        Ok(rows)
    }
}

/// Writes of instances and snapshots, inside a transaction.
pub mod write {
    use super::*;

    /// Inserts a new instance; fails (constraint) if the name is taken.
    pub fn insert(tx: &Transaction<'_>, r: &InstanceRow) -> Result<(), DbError> {
        tx.execute(
            &format!("INSERT INTO instances ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
            params![
                r.name,
                r.id,
                r.kind,
                r.status.as_str(),
                to_json(&r.config),
                to_json(&r.devices),
                r.ephemeral as i64,
                r.description,
                r.image,
                r.created_at,
                r.last_used_at
            ],
        )?;
        Ok(())
    }

    /// Replaces an instance's mutable fields.
    pub fn update(tx: &Transaction<'_>, r: &InstanceRow) -> Result<(), DbError> {
        tx.execute(
            "UPDATE instances SET status = ?2, config = ?3, devices = ?4, ephemeral = ?5, description = ?6,
             last_used_at = ?7 WHERE name = ?1",
            params![
                r.name,
                r.status.as_str(),
                to_json(&r.config),
                to_json(&r.devices),
                r.ephemeral as i64,
                r.description,
                r.last_used_at
            ],
        )?;
        Ok(())
    }

    /// Removes an instance and its snapshots.
    pub fn delete(tx: &Transaction<'_>, name: &str) -> Result<(), DbError> {
        tx.execute("DELETE FROM instances WHERE name = ?1", [name])?;
        Ok(())
    }

    /// Adds a snapshot row.
    pub fn add_snapshot(tx: &Transaction<'_>, instance: &str, s: &SnapshotRow) -> Result<(), DbError> {
        tx.execute(
            "INSERT INTO snapshots (instance, name, created_at, config) VALUES (?1, ?2, ?3, ?4)",
            params![instance, s.name, s.created_at, to_json(&s.config)],
        )?;
        Ok(())
    }

    /// Removes a snapshot row.
    pub fn delete_snapshot(tx: &Transaction<'_>, instance: &str, name: &str) -> Result<(), DbError> {
        tx.execute("DELETE FROM snapshots WHERE instance = ?1 AND name = ?2", [instance, name])?;
        Ok(())
    }

    /// Renames a snapshot row.
    pub fn rename_snapshot(tx: &Transaction<'_>, instance: &str, old: &str, new: &str) -> Result<(), DbError> {
        tx.execute("UPDATE snapshots SET name = ?3 WHERE instance = ?1 AND name = ?2", [instance, old, new])?;
        Ok(())
    }

    /// Adds or replaces an image alias.
    pub fn set_alias(tx: &Transaction<'_>, name: &str, target: &str, description: &str) -> Result<(), DbError> {
        tx.execute(
            "INSERT OR REPLACE INTO image_aliases (name, target, description) VALUES (?1, ?2, ?3)",
            [name, target, description],
        )?;
        Ok(())
    }

    /// Removes an image alias; whether it existed.
    pub fn delete_alias(tx: &Transaction<'_>, name: &str) -> Result<bool, DbError> {
        Ok(tx.execute("DELETE FROM image_aliases WHERE name = ?1", [name])? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str) -> InstanceRow {
        InstanceRow {
            name: name.into(),
            id: format!("id-{name}"),
            kind: "virtual-machine".into(),
            status: Status::Creating,
            config: BTreeMap::from([("limits.cpu".into(), "2".into())]),
            devices: BTreeMap::new(),
            ephemeral: false,
            description: String::new(),
            image: "abc".into(),
            created_at: "t".into(),
            last_used_at: "t".into(),
        }
    }

    #[test]
    fn instances_snapshots_and_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut db = Db::open(&path).unwrap();
            db.tx(|tx| write::insert(tx, &row("web"))).unwrap();
            assert!(db.tx(|tx| write::insert(tx, &row("web"))).is_err(), "names are unique");
            db.tx(|tx| {
                let mut r = row("web");
                r.status = Status::Running;
                write::update(tx, &r)?;
                write::add_snapshot(
                    tx,
                    "web",
                    &SnapshotRow { name: "s1".into(), created_at: "1".into(), config: BTreeMap::new() },
                )
            })
            .unwrap();
            // A failed transaction changes nothing.
            let r: Result<(), DbError> = db.tx(|tx| {
                let mut r = row("web");
                r.status = Status::Error;
                write::update(tx, &r)?;
                Err(DbError::TooNew { found: 0, known: 0 })
            });
            assert!(r.is_err());
        }
        let mut db = Db::open(&path).unwrap();
        let web = db.instance("web").unwrap().unwrap();
        assert_eq!(web.status, Status::Running);
        assert_eq!(web.config["limits.cpu"], "2");
        db.tx(|tx| write::rename_snapshot(tx, "web", "s1", "s2")).unwrap();
        assert_eq!(db.snapshots("web").unwrap()[0].name, "s2");
        db.tx(|tx| write::delete(tx, "web")).unwrap();
        assert!(db.instance("web").unwrap().is_none());
        assert!(db.snapshots("web").unwrap().is_empty(), "snapshots go with the instance");
    }
}
