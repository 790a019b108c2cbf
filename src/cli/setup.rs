//! The commands a package and a service manager run: `check` (systemd's `ExecStartPre=`) and
//! `env-file` (the `.deb`'s `/etc/appliance/appliance.env`, generated from the settings table so
//! it cannot drift from `--help`), and acting as the data directory's owner when run as root.

use std::path::Path;

use super::CliError;
use crate::config::{Config, ConfigError, SETTINGS};
use crate::ops::check::{check, Severity};

/// Run as root against a data directory another user owns (the package's `appliance` user),
/// every command acts as that user: a file root created there (a plugin, the state file's lock)
/// would be unreadable to the service.
pub(super) fn act_as_data_dir_owner(data_dir: &Path) -> Result<(), CliError> {
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    use std::os::unix::fs::MetadataExt;
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(data_dir) else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    let (uid, gid) = (Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid()));
    let fail = |e: nix::Error| {
        CliError::Other(format!(
            "cannot act as the owner of {} (uid {uid}): {e}",
            data_dir.display()
        ))
    };
    setgroups(&[gid]).map_err(fail)?;
    setgid(gid).map_err(fail)?;
    setuid(uid).map_err(fail)?;
    Ok(())
}

/// Prints one line per finding and a closing line; fails (exit 1) if any finding is a problem.
pub(super) fn run_check(config: &Config, services: bool) -> Result<(), CliError> {
    let report = check(config, services);
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

/// An env file listing every setting, each with its help text: commented out at its default, or
/// set to the value `overrides` (`NAME=VALUE`) gives it.
pub fn env_file_text(overrides: &[String]) -> Result<String, CliError> {
    let mut chosen = Vec::new();
    for given in overrides {
        let (name, value) = given.split_once('=').ok_or_else(|| ConfigError {
            name: "--set",
            value: given.clone(),
            allowed: "NAME=VALUE".into(),
        })?;
        if !SETTINGS.iter().any(|s| s.name == name) {
            return Err(ConfigError {
                name: "--set",
                value: given.clone(),
                allowed: "the name of a setting listed in --help".into(),
            }
            .into());
        }
        chosen.push((name.to_owned(), value.to_owned()));
    }
    // Values are checked as start-up would check them.
    Config::from_vars(chosen.clone())?;
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
        match chosen.iter().find(|(name, _)| name == s.name) {
            Some((_, value)) => out.push_str(&format!("{}={value}\n", s.name)),
            None => out.push_str(&format!("#{}={}\n", s.name, s.default.unwrap_or(""))),
        }
    }
    Ok(out)
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
        let text = env_file_text(&[]).unwrap();
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

    #[test]
    fn chosen_settings_are_written_uncommented_and_checked() {
        let text = env_file_text(&["DATA_DIR=/var/lib/appliance".into()]).unwrap();
        assert!(text.contains("\nDATA_DIR=/var/lib/appliance\n"), "{text}");
        assert!(!text.contains("#DATA_DIR="));
        assert!(env_file_text(&["NO_SUCH_SETTING=1".into()]).is_err());
        assert!(env_file_text(&["WEB_PORT=eighty".into()]).is_err());
    }
}
