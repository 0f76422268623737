//! cloud-init's NoCloud seed: `--cloud-init user-data=FILE[,meta-data=FILE][,network-config=FILE]`.
//!
//! Vireo writes the seed itself: a small FAT12 volume labelled `CIDATA`
//! (cloud-init looks for the label in either case) holding `user-data`,
//! `meta-data` and, when given, `network-config`, attached as a read-only
//! virtio-blk disk after the user's disks. This is the disk a user of a cloud
//! image makes with `cloud-localds`.
//!
//! Invariants: every file is read and checked before the VM is built (a
//! missing or unreadable file, YAML that does not parse, a `#cloud-config`
//! that is not a mapping, meta-data without an `instance-id` are
//! [`SeedError`]s naming the file and the reason), so a bad seed never
//! reaches the guest. Without a meta-data file the seed carries
//! `instance-id: iid-vireo-<hash of the user-data and network-config>` (the
//! same inputs give the same id, so cloud-init runs its once-per-instance
//! modules again only when they change) and `local-hostname: vireo`.
//! The seed is built in memory; [`SeedFile`] writes it to a private file
//! that is removed when the guard is dropped (the VMM drops it once the
//! disk is open: the open descriptor keeps the data for the guest).

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::options::{OptionError, Options};

/// The hostname the default meta-data gives the guest.
pub const DEFAULT_HOSTNAME: &str = "vireo";
/// The FAT volume label cloud-init's NoCloud datasource looks for.
pub const SEED_LABEL: &[u8; 11] = b"CIDATA     ";
/// Largest file accepted into the seed (cloud-init's own limit for
/// user-data is far below this; a bigger file is a mistake).
pub const MAX_SEED_FILE: u64 = 16 << 20;

/// The files of a NoCloud seed, as the user names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitConfig {
    pub user_data: PathBuf,
    #[serde(default)]
    pub meta_data: Option<PathBuf>,
    #[serde(default)]
    pub network_config: Option<PathBuf>,
}

impl FromStr for CloudInitConfig {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        const KEYS: &[&str] = &["user-data", "meta-data", "network-config"];
        let o = Options::parse("cloud-init", s, KEYS)?;
        let user_data: PathBuf = o.required("user-data")?;
        let nonempty = |key: &'static str, p: Option<PathBuf>| match p {
            Some(p) if p.as_os_str().is_empty() => Err(OptionError::BadValue {
                option: "cloud-init",
                key,
                value: String::new(),
                reason: "an empty path".into(),
            }),
            p => Ok(p),
        };
        Ok(CloudInitConfig {
            user_data: nonempty("user-data", Some(user_data))?.unwrap_or_default(),
            meta_data: nonempty("meta-data", o.value("meta-data")?)?,
            network_config: nonempty("network-config", o.value("network-config")?)?,
        })
    }
}

/// Why a seed cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cloud-init {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cloud-init {what} {} is {size} bytes, more than the {} MiB a seed file may have", path.display(), MAX_SEED_FILE >> 20)]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        size: u64,
    },
    #[error("cloud-init {what} {}: {reason}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot write the cloud-init seed: {0}")]
    Write(std::io::Error),
}

/// The checked contents of a seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub user_data: Vec<u8>,
    pub meta_data: Vec<u8>,
    pub network_config: Option<Vec<u8>>,
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, SeedError> {
    let err = |source| SeedError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(SeedError::Invalid {
            what,
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    if meta.len() > MAX_SEED_FILE {
        return Err(SeedError::TooLarge {
            what,
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    std::fs::read(path).map_err(err)
}

/// Parse `data` as YAML that must be a mapping (or empty, when `empty_ok`).
fn yaml_mapping(
    what: &'static str,
    path: &Path,
    data: &[u8],
    empty_ok: bool,
) -> Result<Option<serde_yaml::Mapping>, SeedError> {
    let invalid = |reason: String| SeedError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(data).map_err(|e| invalid(format!("not UTF-8 text ({e})")))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| invalid(format!("not valid YAML: {e}")))?;
    match value {
        serde_yaml::Value::Mapping(m) => Ok(Some(m)),
        serde_yaml::Value::Null if empty_ok => Ok(None),
        other => Err(invalid(format!(
            "the YAML is a {}, not a mapping of keys to values",
            yaml_kind(&other)
        ))),
    }
}

fn yaml_kind(v: &serde_yaml::Value) -> &'static str {
    match v {
        serde_yaml::Value::Null => "null (empty document)",
        serde_yaml::Value::Bool(_) => "boolean",
        serde_yaml::Value::Number(_) => "number",
        serde_yaml::Value::String(_) => "string",
        serde_yaml::Value::Sequence(_) => "list",
        serde_yaml::Value::Mapping(_) => "mapping",
        serde_yaml::Value::Tagged(_) => "tagged value",
    }
}

/// The first-line headers cloud-init acts on (its user-data "part
/// handlers"). Content without one is ignored by cloud-init, so it is
/// refused here: the user meant something else.
const USER_DATA_HEADERS: &[&str] = &[
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#upstart-job",
    "#part-handler",
    "## template: jinja",
    "Content-Type:",
    "MIME-Version:",
];

fn check_user_data(path: &Path, data: &[u8]) -> Result<(), SeedError> {
    const WHAT: &str = "user-data";
    // gzip-compressed user-data: cloud-init unpacks it itself.
    if data.starts_with(&[0x1f, 0x8b]) {
        return Ok(());
    }
    let first = data.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let first = first.trim_end_matches('\r');
    if first.trim_end() == "#cloud-config" {
        yaml_mapping(WHAT, path, data, true)?;
        return Ok(());
    }
    if USER_DATA_HEADERS.iter().any(|h| first.starts_with(h)) {
        return Ok(());
    }
    Err(SeedError::Invalid {
        what: WHAT,
        path: path.to_path_buf(),
        reason: format!(
            "its first line '{}' is not one cloud-init acts on (a '#cloud-config' YAML document, a '#!' script, '#include', MIME multipart, ...); cloud-init would ignore it",
            first.chars().take(60).collect::<String>()
        ),
    })
}

/// A stable instance-id for seeds without meta-data: it changes only when
/// what the seed asks the guest to do changes.
fn default_instance_id(user_data: &[u8], network_config: Option<&[u8]>) -> String {
    let mut h = Sha256::new();
    h.update((user_data.len() as u64).to_le_bytes());
    h.update(user_data);
    if let Some(n) = network_config {
        h.update(n);
    }
    let d = h.finalize();
    let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("iid-vireo-{hex}")
}

impl Seed {
    /// Read and check the files `cfg` names.
    pub fn load(cfg: &CloudInitConfig) -> Result<Seed, SeedError> {
        let user_data = read_file("user-data", &cfg.user_data)?;
        check_user_data(&cfg.user_data, &user_data)?;
        let network_config = match &cfg.network_config {
            Some(p) => {
                let data = read_file("network-config", p)?;
                yaml_mapping("network-config", p, &data, false)?;
                Some(data)
            }
            None => None,
        };
        let meta_data = match &cfg.meta_data {
            Some(p) => {
                let data = read_file("meta-data", p)?;
                let map = yaml_mapping("meta-data", p, &data, false)?.unwrap_or_default();
                // NoCloud keys its per-instance state on this: without it
                // cloud-init cannot tell a first boot from the next.
                if !map.contains_key("instance-id") {
                    return Err(SeedError::Invalid {
                        what: "meta-data",
                        path: p.clone(),
                        reason:
                            "it has no instance-id (NoCloud needs one, e.g. 'instance-id: my-vm-1')"
                                .into(),
                    });
                }
                data
            }
            None => format!(
                "instance-id: {}\nlocal-hostname: {DEFAULT_HOSTNAME}\n",
                default_instance_id(&user_data, network_config.as_deref())
            )
            .into_bytes(),
        };
        Ok(Seed {
            user_data,
            meta_data,
            network_config,
        })
    }

    /// The seed as a raw FAT12 disk image labelled `CIDATA`.
    pub fn to_image(&self) -> Result<Vec<u8>, SeedError> {
        let mut files: Vec<(&str, &[u8])> = vec![
            ("user-data", &self.user_data),
            ("meta-data", &self.meta_data),
        ];
        if let Some(n) = &self.network_config {
            files.push(("network-config", n));
        }
        // Room for the files in 4 KiB clusters plus the FATs and root
        // directory, rounded up to whole MiB; FAT12 reaches 16 MiB with
        // 4 KiB clusters and FAT16 beyond, which the library picks.
        let data: u64 = files
            .iter()
            .map(|(_, d)| (d.len() as u64).div_ceil(4096) * 4096)
            .sum();
        let size = (data + (1 << 20)).div_ceil(1 << 20) * (1 << 20);
        let mut disk = Cursor::new(vec![0u8; size as usize]);
        fatfs::format_volume(
            &mut disk,
            fatfs::FormatVolumeOptions::new()
                .volume_label(*SEED_LABEL)
                .bytes_per_cluster(4096),
        )
        .map_err(SeedError::Write)?;
        disk.set_position(0);
        {
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())
                .map_err(SeedError::Write)?;
            let root = fs.root_dir();
            for (name, data) in &files {
                let mut f = root.create_file(name).map_err(SeedError::Write)?;
                f.write_all(data).map_err(SeedError::Write)?;
                f.flush().map_err(SeedError::Write)?;
            }
            drop(root);
            fs.unmount().map_err(SeedError::Write)?;
        }
        Ok(disk.into_inner())
    }
}

/// A seed image written to a private file, removed when dropped.
#[derive(Debug)]
pub struct SeedFile {
    path: PathBuf,
}

impl SeedFile {
    /// Write `image` to a new file (mode 0600, never an existing one) in `dir`.
    pub fn write_in(dir: &Path, image: &[u8]) -> Result<SeedFile, SeedError> {
        use std::os::unix::fs::OpenOptionsExt;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("vireo-cidata-{}-{n}.img", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                SeedError::Write(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", path.display()),
                ))
            })?;
        let seed = SeedFile { path };
        f.write_all(image).map_err(SeedError::Write)?;
        Ok(seed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SeedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vireo-ci-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn options_parse() {
        let c: CloudInitConfig = "user-data=/u,meta-data=/m,network-config=/n"
            .parse()
            .unwrap();
        assert_eq!(c.user_data, PathBuf::from("/u"));
        assert_eq!(c.meta_data, Some(PathBuf::from("/m")));
        assert_eq!(c.network_config, Some(PathBuf::from("/n")));
        let e = "meta-data=/m"
            .parse::<CloudInitConfig>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("user-data"), "{e}");
        let e = "user-data=/u,vendor-data=/v"
            .parse::<CloudInitConfig>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("vendor-data"), "{e}");
    }

    #[test]
    fn default_meta_data_and_image() {
        let u = tmp("ud1", "#cloud-config\nruncmd:\n  - echo hi\n");
        let seed = Seed::load(&CloudInitConfig {
            user_data: u,
            meta_data: None,
            network_config: None,
        })
        .unwrap();
        let md = String::from_utf8(seed.meta_data.clone()).unwrap();
        assert!(md.starts_with("instance-id: iid-vireo-"), "{md}");
        assert!(md.contains("local-hostname: vireo\n"), "{md}");
        let img = seed.to_image().unwrap();
        let fs = fatfs::FileSystem::new(Cursor::new(img), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["meta-data", "user-data"]);
        let mut back = Vec::new();
        std::io::Read::read_to_end(
            &mut fs.root_dir().open_file("user-data").unwrap(),
            &mut back,
        )
        .unwrap();
        assert_eq!(back, seed.user_data);
    }

    #[test]
    fn bad_inputs_are_named() {
        let load = |u: PathBuf, m: Option<PathBuf>, n: Option<PathBuf>| {
            Seed::load(&CloudInitConfig {
                user_data: u,
                meta_data: m,
                network_config: n,
            })
            .unwrap_err()
            .to_string()
        };
        let good = tmp("ud2", "#cloud-config\n{}\n");
        let e = load("/nonexistent/ud".into(), None, None);
        assert!(
            e.contains("user-data /nonexistent/ud") && e.contains("No such file"),
            "{e}"
        );
        let e = load(tmp("ud3", "#cloud-config\nruncmd: [a\n"), None, None);
        assert!(e.contains("not valid YAML"), "{e}");
        let e = load(tmp("ud4", "#cloud-config\n- a\n- b\n"), None, None);
        assert!(e.contains("list, not a mapping"), "{e}");
        let e = load(tmp("ud5", "hello\n"), None, None);
        assert!(e.contains("first line 'hello'"), "{e}");
        let e = load(good.clone(), Some(tmp("md1", "local-hostname: x\n")), None);
        assert!(
            e.contains("meta-data") && e.contains("no instance-id"),
            "{e}"
        );
        let e = load(good.clone(), Some(tmp("md2", "instance-id: [\n")), None);
        assert!(
            e.contains("meta-data") && e.contains("not valid YAML"),
            "{e}"
        );
        let e = load(
            good.clone(),
            None,
            Some(tmp("nc1", "version: 2\n ethernets: {\n")),
        );
        assert!(
            e.contains("network-config") && e.contains("not valid YAML"),
            "{e}"
        );
        let e = load(good, None, Some("/nonexistent/nc".into()));
        assert!(e.contains("network-config /nonexistent/nc"), "{e}");
        // A shell script is user-data cloud-init runs as it is.
        Seed::load(&CloudInitConfig {
            user_data: tmp("ud6", "#!/bin/sh\necho hi\n"),
            meta_data: None,
            network_config: None,
        })
        .unwrap();
    }
}
