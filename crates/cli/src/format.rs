//! Output: tables in Incus's style (`+----+` boxes, multi-line cells),
//! compact tables, CSV, and the raw API objects as JSON or YAML.

use std::fmt::Write as _;

use clap::ValueEnum;
use serde::Serialize;

/// How lists are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// A boxed table.
    #[default]
    Table,
    /// A table without borders.
    Compact,
    /// Comma-separated values, no header.
    Csv,
    /// The API objects as JSON.
    Json,
    /// The API objects as YAML.
    Yaml,
}

/// A table: headers and rows of cells (a cell may hold several lines).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Column names.
    pub headers: Vec<String>,
    /// Rows, each with one cell per header.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these headers.
    pub fn new(headers: &[&str]) -> Table {
        Table { headers: headers.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(w.len()) {
                for line in cell.lines() {
                    w[i] = w[i].max(line.chars().count());
                }
            }
        }
        w
    }

    /// The boxed table.
    pub fn boxed(&self) -> String {
        let w = self.widths();
        let sep: String = w.iter().fold("+".to_string(), |s, n| s + &"-".repeat(n + 2) + "+") + "\n";
        let mut out = sep.clone();
        out += &line(&self.headers.iter().map(String::as_str).collect::<Vec<_>>(), &w, true);
        out += &sep;
        for row in &self.rows {
            out += &cells(row, &w, false);
            out += &sep;
        }
        out
    }

    /// The table without borders.
    pub fn compact(&self) -> String {
        let w = self.widths();
        let mut out = String::new();
        let head: Vec<&str> = self.headers.iter().map(String::as_str).collect();
        out += &compact_line(&head, &w);
        for row in &self.rows {
            let lines = row.iter().map(|c| c.lines().count()).max().unwrap_or(1).max(1);
            for i in 0..lines {
                let parts: Vec<&str> = row.iter().map(|c| c.lines().nth(i).unwrap_or("")).collect();
                out += &compact_line(&parts, &w);
            }
        }
        out
    }

    /// CSV rows (no header, like Incus).
    pub fn csv(&self) -> String {
        let mut out = String::new();
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
            let _ = writeln!(out, "{}", cells.join(","));
        }
        out
    }

    /// The table in a text format (JSON and YAML: the boxed table).
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Compact => self.compact(),
            Format::Csv => self.csv(),
            _ => self.boxed(),
        }
    }
}

fn line(parts: &[&str], w: &[usize], center: bool) -> String {
    let mut s = "|".to_string();
    for (p, n) in parts.iter().zip(w) {
        if center {
            let pad = n - p.chars().count();
            let _ = write!(s, " {}{}{} |", " ".repeat(pad / 2), p, " ".repeat(pad - pad / 2));
        } else {
            let _ = write!(s, " {p:<n$} |");
        }
    }
    s + "\n"
}

fn cells(row: &[String], w: &[usize], center: bool) -> String {
    let lines = row.iter().map(|c| c.lines().count()).max().unwrap_or(1).max(1);
    (0..lines)
        .map(|i| line(&row.iter().map(|c| c.lines().nth(i).unwrap_or("")).collect::<Vec<_>>(), w, center))
        .collect()
}

fn compact_line(parts: &[&str], w: &[usize]) -> String {
    let mut s = String::new();
    for (p, n) in parts.iter().zip(w) {
        let _ = write!(s, "  {p:<n$}");
    }
    s.trim_end().to_string() + "\n"
}

fn csv_cell(c: &str) -> String {
    if c.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c.to_string()
    }
}

/// Writes to stdout; when the reader went away (`skiff list | head`),
/// exits quietly with 141 like a process killed by SIGPIPE.
pub fn emit(bytes: impl AsRef<[u8]>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes.as_ref()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("Error: Failed to write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Prints a list: the table, or the raw objects for JSON and YAML.
pub fn print_list<T: Serialize + ?Sized>(format: Format, table: &Table, raw: &T) -> anyhow::Result<()> {
    emit(render_list(format, table, raw)?);
    Ok(())
}

/// What [`print_list`] prints.
pub fn render_list<T: Serialize + ?Sized>(format: Format, table: &Table, raw: &T) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string(raw)? + "\n",
        Format::Yaml => serde_yaml::to_string(raw)?,
        f => table.render(f),
    })
}

/// Bytes in binary units (`1.50MiB`), like Incus.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.2}{}", UNITS[u])
    }
}

/// An RFC 3339 time as `2026/11/22 00:06 UTC` (the zero time: empty).
pub fn time(rfc3339: &str) -> String {
    if rfc3339.is_empty() || rfc3339.starts_with("0001-01-01") {
        return String::new();
    }
    match (rfc3339.get(0..10), rfc3339.get(11..16)) {
        (Some(d), Some(t)) if rfc3339.ends_with('Z') => format!("{} {t} UTC", d.replace('-', "/")),
        _ => rfc3339.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Table {
        let mut t = Table::new(&["NAME", "STATE", "IPV4"]);
        t.row(vec!["web".into(), "RUNNING".into(), "10.0.0.2 (eth0)\n10.0.1.2 (eth1)".into()]);
        t.row(vec!["db,x".into(), "STOPPED".into(), "".into()]);
        t
    }

    #[test]
    fn table() {
        let expected = "\
+------+---------+-----------------+
| NAME |  STATE  |      IPV4       |
+------+---------+-----------------+
| web  | RUNNING | 10.0.0.2 (eth0) |
|      |         | 10.0.1.2 (eth1) |
+------+---------+-----------------+
| db,x | STOPPED |                 |
+------+---------+-----------------+
";
        assert_eq!(sample().boxed(), expected);
        assert_eq!(sample().compact(), "  NAME  STATE    IPV4\n  web   RUNNING  10.0.0.2 (eth0)\n                 10.0.1.2 (eth1)\n  db,x  STOPPED\n");
    }

    #[test]
    fn csv_json_yaml() {
        assert_eq!(sample().csv(), "web,RUNNING,\"10.0.0.2 (eth0)\n10.0.1.2 (eth1)\"\n\"db,x\",STOPPED,\n");
        let raw = json!([{"name": "web", "status": "Running"}]);
        assert_eq!(
            render_list(Format::Json, &sample(), &raw).unwrap(),
            "[{\"name\":\"web\",\"status\":\"Running\"}]\n"
        );
        assert_eq!(render_list(Format::Yaml, &sample(), &raw).unwrap(), "- name: web\n  status: Running\n");
        assert_eq!(render_list(Format::Csv, &sample(), &raw).unwrap(), sample().csv());
    }

    #[test]
    fn units() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.50KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.00GiB");
        assert_eq!(time("2026-11-22T00:06:16.976127723Z"), "2026/11/22 00:06 UTC");
        assert_eq!(time("0001-01-01T00:00:00Z"), "");
    }
}
