//! `vireo img`: the disk image tool (create, info, check, compare, convert,
//! resize, commit, rebase), a front end to `block::img`. Options follow
//! qemu-img's where they mean the same (`-f`, `-O`, `-b`, `-F`, `-o
//! cluster_size=`, `-u`), so scripts can switch. Errors are one line on
//! stderr; see docs/images.md for the exit codes.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use block::img::{self, Comparison, ConvertSpec, CreateSpec};
use block::ImageFormat;
use clap::{Args, Subcommand, ValueEnum};

#[derive(Args)]
pub struct ImgArgs {
    #[command(subcommand)]
    cmd: ImgCommand,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(Subcommand)]
enum ImgCommand {
    /// Create a new raw or qcow2 image (qcow2 optionally over a backing
    /// file); never overwrites an existing file.
    Create(CreateArgs),
    /// Show an image's format, virtual size, allocation and backing chain.
    Info(InfoArgs),
    /// Check an image's metadata (qcow2 refcounts, VMDK grain tables,
    /// VHDX BAT). Exit 0 clean, 2 corruptions, 3 leaked clusters only.
    Check(CheckArgs),
    /// Compare two images' contents (any formats). Exit 0 identical,
    /// 1 different, 2 error.
    Compare(CompareArgs),
    /// Copy an image (raw, qcow2, VMDK, VHDX, or a block device: P2V) into
    /// a new raw or qcow2 image, skipping zero regions.
    Convert(ConvertArgs),
    /// Change an image's virtual size (qcow2 grows only).
    Resize(ResizeArgs),
    /// Write a qcow2 overlay's data into its backing file.
    Commit(CommitArgs),
    /// Give a qcow2 overlay another backing file (or none, with -b "").
    Rebase(RebaseArgs),
}

#[derive(Args)]
struct CreateArgs {
    /// Format of the new image: raw or qcow2.
    #[arg(short = 'f', long = "format", default_value = "raw")]
    format: ImageFormat,
    /// Backing file (qcow2), stored as given: relative to the new image's directory.
    #[arg(short = 'b', long = "backing")]
    backing: Option<PathBuf>,
    /// The backing file's format (probed if not given).
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<ImageFormat>,
    /// Format options: cluster_size=SIZE (qcow2, 512 to 2M, power of two).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Option<String>,
    file: PathBuf,
    /// Virtual size (K, M, G, T suffixes); with -b, defaults to the backing file's.
    size: Option<String>,
}

#[derive(Args)]
struct InfoArgs {
    #[arg(short = 'f', long = "format")]
    format: Option<ImageFormat>,
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Accepted for qemu-img compatibility: the chain is always shown.
    #[arg(long)]
    backing_chain: bool,
    file: PathBuf,
}

#[derive(Args)]
struct CheckArgs {
    #[arg(short = 'f', long = "format")]
    format: Option<ImageFormat>,
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    file: PathBuf,
}

#[derive(Args)]
struct CompareArgs {
    #[arg(short = 'f')]
    format_a: Option<ImageFormat>,
    #[arg(short = 'F')]
    format_b: Option<ImageFormat>,
    /// Images of different sizes differ (otherwise the longer one must
    /// read as zeros past the shorter one's end).
    #[arg(short = 's', long)]
    strict: bool,
    a: PathBuf,
    b: PathBuf,
}

#[derive(Args)]
struct ConvertArgs {
    /// Source format (probed if not given).
    #[arg(short = 'f', long = "format")]
    format: Option<ImageFormat>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    output_format: ImageFormat,
    /// Format options: cluster_size=SIZE (qcow2).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Option<String>,
    /// No progress output.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Accepted for qemu-img compatibility (progress is shown unless -q).
    #[arg(short = 'p', hide = true)]
    progress: bool,
    src: PathBuf,
    dst: PathBuf,
}

#[derive(Args)]
struct ResizeArgs {
    #[arg(short = 'f', long = "format")]
    format: Option<ImageFormat>,
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    file: PathBuf,
    /// The new size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

#[derive(Args)]
struct CommitArgs {
    #[arg(short = 'q', long)]
    quiet: bool,
    file: PathBuf,
}

#[derive(Args)]
struct RebaseArgs {
    /// New backing file ("" for none), relative to the overlay's directory.
    #[arg(short = 'b', long = "backing")]
    backing: String,
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<ImageFormat>,
    /// Only rewrite the header (the new backing file has the same
    /// contents as the old one, e.g. it was moved).
    #[arg(short = 'u', long = "unsafe")]
    header_only: bool,
    #[arg(short = 'q', long)]
    quiet: bool,
    file: PathBuf,
}

/// Progress on stderr: a bar redrawn in place on a terminal, a plain line
/// every few seconds otherwise; nothing with `quiet`.
struct Progress {
    what: &'static str,
    tty: bool,
    quiet: bool,
    start: Instant,
    last: Option<Instant>,
    drawn: bool,
}

impl Progress {
    fn new(what: &'static str, quiet: bool) -> Self {
        Progress {
            what,
            tty: std::io::stderr().is_terminal(),
            quiet,
            start: Instant::now(),
            last: None,
            drawn: false,
        }
    }

    fn line(&self, done: u64, total: u64, width: usize) -> String {
        let pct = if total > 0 {
            (done as f64 * 100.0 / total as f64).min(100.0)
        } else {
            100.0
        };
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s = String::new();
        if width > 0 {
            let fill = ((pct / 100.0) * width as f64).round() as usize;
            s += &format!(
                "[{}{}] ",
                "#".repeat(fill),
                " ".repeat(width - fill.min(width))
            );
        }
        s += &format!(
            "{} {pct:5.1}% {:.0}/{:.0} MiB, {:.0} MiB/s",
            self.what,
            mib(done),
            mib(total),
            mib(done) / secs
        );
        s
    }

    fn update(&mut self, done: u64, total: u64) {
        if self.quiet {
            return;
        }
        let every = if self.tty {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(2)
        };
        if self.last.is_some_and(|t| t.elapsed() < every) && done < total {
            return;
        }
        self.last = Some(Instant::now());
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{}", self.line(done, total, 30));
            self.drawn = true;
        } else {
            let _ = writeln!(err, "{}", self.line(done, total, 0));
        }
        let _ = err.flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// `key=value,...` format options; only cluster_size is known.
fn cluster_bits(options: Option<&str>) -> Result<u32, String> {
    let mut bits = 16;
    for opt in options.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        match opt.split_once('=') {
            Some(("cluster_size", v)) => {
                let n = img::parse_size(v)?;
                if !n.is_power_of_two() || !(512..=(2 << 20)).contains(&n) {
                    return Err(format!(
                        "cluster_size {n}: must be a power of two from 512 to 2M"
                    ));
                }
                bits = n.trailing_zeros();
            }
            _ => {
                return Err(format!(
                    "unknown format option '{opt}' (known: cluster_size=SIZE)"
                ))
            }
        }
    }
    Ok(bits)
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// Run one `vireo img` command; returns the exit code.
pub fn run(args: ImgArgs) -> i32 {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vireo img: error: {e}");
            1
        }
    }
}

fn run_inner(args: ImgArgs) -> Result<i32, String> {
    let e = |e: block::BlockError| e.to_string();
    match args.cmd {
        ImgCommand::Create(a) => {
            let size = a.size.as_deref().map(img::parse_size).transpose()?;
            let bits = cluster_bits(a.options.as_deref())?;
            img::create(
                &a.file,
                &CreateSpec {
                    format: a.format,
                    size,
                    backing: a.backing.map(|b| (b, a.backing_format)),
                    cluster_bits: bits,
                },
            )
            .map_err(e)?;
            print(&format!(
                "Formatting '{}', fmt={}\n",
                a.file.display(),
                a.format
            ));
            Ok(0)
        }
        ImgCommand::Info(a) => {
            let info = img::info(&a.file, a.format).map_err(e)?;
            print(&match a.output {
                Output::Json => json(&info),
                Output::Human => info.text(),
            });
            Ok(0)
        }
        ImgCommand::Check(a) => {
            let r = img::check(&a.file, a.format).map_err(e)?;
            print(&match a.output {
                Output::Json => json(&r),
                Output::Human => r.text(),
            });
            Ok(r.exit_code())
        }
        ImgCommand::Compare(a) => {
            let r = img::compare(&a.a, a.format_a, &a.b, a.format_b, a.strict, &mut |_, _| {});
            match r {
                Ok(Comparison::Identical) => {
                    print("Images are identical.\n");
                    Ok(0)
                }
                Ok(Comparison::Differ(off)) => {
                    print(&format!("Content mismatch at offset {off}!\n"));
                    Ok(1)
                }
                Ok(Comparison::SizeDiffers { a: sa, b: sb }) => {
                    print(&format!(
                        "Image size mismatch! ({sa} and {sb} bytes, and the longer one has data past the end of the shorter)\n"
                    ));
                    Ok(1)
                }
                Err(err) => {
                    eprintln!("vireo img: error: {err}");
                    Ok(2)
                }
            }
        }
        ImgCommand::Convert(a) => {
            let bits = cluster_bits(a.options.as_deref())?;
            let mut p = Progress::new("convert", a.quiet);
            let stats = img::convert(
                &a.src,
                &a.dst,
                &ConvertSpec {
                    src_format: a.format,
                    dst_format: a.output_format,
                    cluster_bits: bits,
                },
                &mut |d, t| p.update(d, t),
            )
            .map_err(e)?;
            drop(p);
            if !a.quiet {
                eprintln!(
                    "vireo img: converted {} ({} bytes) to {} {}: {} bytes read, {} bytes written",
                    a.src.display(),
                    stats.virtual_size,
                    a.output_format,
                    a.dst.display(),
                    stats.bytes_read,
                    stats.bytes_written
                );
            }
            Ok(0)
        }
        ImgCommand::Resize(a) => {
            let s = a.size.trim();
            let new = if let Some(rel) = s.strip_prefix('+').or_else(|| s.strip_prefix('-')) {
                let delta = img::parse_size(rel)?;
                let cur = img::info(&a.file, a.format).map_err(e)?.image.virtual_size;
                if s.starts_with('+') {
                    cur.checked_add(delta).ok_or("size overflows")?
                } else {
                    cur.checked_sub(delta)
                        .ok_or("cannot shrink below zero bytes")?
                }
            } else {
                img::parse_size(s)?
            };
            img::resize(&a.file, a.format, new, a.shrink).map_err(e)?;
            print("Image resized.\n");
            Ok(0)
        }
        ImgCommand::Commit(a) => {
            let mut p = Progress::new("commit", a.quiet);
            let n = img::commit(&a.file, &mut |d, t| p.update(d, t)).map_err(e)?;
            drop(p);
            print(&format!(
                "Image committed ({n} bytes written to the backing file).\n"
            ));
            Ok(0)
        }
        ImgCommand::Rebase(a) => {
            let mut p = Progress::new("rebase", a.quiet || a.header_only);
            let backing = (!a.backing.is_empty()).then(|| Path::new(&a.backing));
            let n = img::rebase(
                &a.file,
                backing.map(|b| (b, a.backing_format)),
                a.header_only,
                &mut |d, t| p.update(d, t),
            )
            .map_err(e)?;
            drop(p);
            if !a.header_only {
                print(&format!(
                    "Image rebased ({n} bytes copied into the overlay).\n"
                ));
            }
            Ok(0)
        }
    }
}
