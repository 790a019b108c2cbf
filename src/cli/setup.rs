//! The commands a package and a service manager run: `check` (systemd's `ExecStartPre=`) and
//! `env-file` (the `.deb`'s `/etc/appliance/appliance.env`, generated from the settings table so
//! it cannot drift from `--help`).

use super::CliError;
use crate::config::{Config, SETTINGS};
use crate::ops::check::{check, Severity};

/// Prints one line per finding and a closing line; fails (exit 1) if any finding is a problem.
pub(super) fn run_check(config: &Config) -> Result<(), CliError> {
    let report = check(config);
    for finding in &report.findings {
        let tag = match finding.severity {
            Severity::Problem => "problem",
            Severity::Warning => "warning",
        };
        println!("{tag}: {}", finding.text);
    }
    match report.problems() {
        0 => {
            println!("ok: configuration; {}", report.passed.join("; "));
            Ok(())
        }
        n => Err(CliError::Other(format!("check found {n} problem(s)"))),
    }
}

/// An env file listing every setting, commented out at its default, each with its help text.
pub fn env_file_text() -> String {
    let mut out = String::from(
        "# appliance configuration, read at start through APPLIANCE_ENV_FILE (the unit sets it).\n\
         # One NAME=value per line; a variable set in the service's environment wins over this file.\n\
         # Every setting is listed below at its default, commented out: uncomment to change one,\n\
         # then `systemctl restart appliance` (`appliance check` says whether the result is usable).\n",
    );
    for s in SETTINGS {
        out.push('\n');
        for line in wrap(s.help, 96) {
            out.push_str(&format!("# {line}\n"));
        }
        out.push_str(&format!("#{}={}\n", s.name, s.default.unwrap_or("")));
    }
    out
}

/// Splits text into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("lines is never empty");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_env_file_lists_every_setting_at_its_default_and_parses_to_the_defaults() {
        let text = env_file_text();
        for s in SETTINGS {
            let line = format!("#{}={}\n", s.name, s.default.unwrap_or(""));
            assert!(text.contains(&line), "{} missing", s.name);
        }
        // Uncommenting every line gives the same configuration as no file at all.
        let vars = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Config::from_vars(vars).expect("the defaults are valid");
        assert_eq!(config.web_port, 3008);
    }
}
