//! TLS for live migration (rustls, with the `ring` crypto provider): the
//! operator's choice beside the shared migration key (`auth.rs`), or on
//! top of it.
//!
//! Each host has a certificate and its private key
//! (`--migration-tls-cert`, `--migration-tls-key`, PEM) and trusts one CA
//! file (`--migration-tls-ca`, PEM, one or more certificates). The same
//! three options serve both ends, so a VMM that received a VM can migrate
//! it on:
//!
//! - a destination with a certificate and key speaks TLS and turns away a
//!   source that does not; with a CA it also demands the source's
//!   certificate and checks it against the CA (mutual TLS);
//! - a source with a CA checks the destination's certificate against it,
//!   for the host name (or IP address) of `vireo migrate --to`, and
//!   presents its own certificate when it has one. A source with a CA
//!   refuses a destination that does not offer TLS (no silent downgrade);
//!   a source without one cannot migrate to a TLS destination.
//!
//! Invariants: the files are read and checked once, when the VMM starts
//! (before its seccomp filters), and a certificate and key that do not
//! belong together, an empty or unparsable file, or a private key others
//! may read is a [`TlsError`] naming the file; a handshake is bounded by
//! the socket timeouts its caller sets; a [`Channel`] is one connection
//! (TLS or plain) whose halves (reader, writer) are used from one thread
//! at a time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// What is wrong with the TLS files, or with a TLS connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be opened or read (missing, no permission, ...).
    #[error("migration TLS {what} {}: {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file holds no PEM item of the kind needed, or a broken one.
    #[error("migration TLS {what} {}: {reason}", path.display())]
    BadFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The private key may be read by other users.
    #[error("migration TLS key {}: other users may read or write it (mode {mode:o}); chmod 600 it", path.display())]
    KeyExposed { path: PathBuf, mode: u32 },
    /// The key is not the certificate's.
    #[error("migration TLS key {} does not belong to the certificate {} (their public keys differ)", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    /// A certificate without its key or the other way round.
    #[error("{0}")]
    Incomplete(&'static str),
    /// rustls refused the configuration.
    #[error("migration TLS: {0}")]
    Config(String),
    /// The destination's address has no name a certificate can carry.
    #[error("migration destination {0}: not a host name or IP address a TLS certificate can name")]
    ServerName(String),
    /// The TLS handshake with a peer failed (certificate not trusted, no
    /// certificate, not TLS at all, timeout).
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
}

/// The loaded TLS settings of this VMM.
#[derive(Debug, Clone)]
pub struct MigrationTls {
    /// As a destination (there is a certificate and key).
    server: Option<Arc<ServerConfig>>,
    /// As a source (there is a CA to check destinations against).
    client: Option<Arc<ClientConfig>>,
    /// The destination demands and checks the source's certificate.
    mutual: bool,
}

/// ring, not rustls's default aws-lc-rs: it builds with a C compiler alone
/// (aws-lc-rs needs cmake and a long C build on every CI machine). rustls
/// marks it deprecated because it lacks post-quantum key exchange; the
/// classical exchange (X25519, ECDHE) is what this gives (docs/security.md
/// says so).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let unreadable = |source| TlsError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    // A certificate bundle is kilobytes; a CA bundle at most a few MiB.
    f.take(16 << 20)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    Ok(bytes)
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadFile {
            what,
            path: path.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadFile {
            what,
            path: path.to_path_buf(),
            reason: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use std::os::unix::fs::MetadataExt;
    let bytes = read_file("key", path)?;
    let mode = std::fs::metadata(path)
        .map_err(|source| TlsError::Unreadable {
            what: "key",
            path: path.to_path_buf(),
            source,
        })?
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyExposed {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::BadFile {
        what: "key",
        path: path.to_path_buf(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into()
            }
            e => format!("bad PEM: {e}"),
        },
    })
}

fn config_error(e: rustls::Error) -> TlsError {
    TlsError::Config(e.to_string())
}

impl MigrationTls {
    /// Load and check the files; None when none is given.
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<MigrationTls>, TlsError> {
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(_), None) => return Err(TlsError::Incomplete(
                "--migration-tls-cert needs --migration-tls-key (the certificate's private key)",
            )),
            (None, Some(_)) => {
                return Err(TlsError::Incomplete(
                    "--migration-tls-key needs --migration-tls-cert (the key's certificate)",
                ))
            }
            (Some(c), Some(k)) => {
                let chain = certs("certificate", c)?;
                let der = private_key(k)?;
                // Refuse a key that is not the certificate's now, not at
                // the first handshake.
                match rustls::sign::CertifiedKey::from_der(
                    chain.clone(),
                    der.clone_key(),
                    &provider(),
                ) {
                    Ok(_) => {}
                    Err(rustls::Error::InconsistentKeys(_)) => {
                        return Err(TlsError::Mismatch {
                            cert: c.to_path_buf(),
                            key: k.to_path_buf(),
                        })
                    }
                    Err(e) => {
                        return Err(TlsError::BadFile {
                            what: "key",
                            path: k.to_path_buf(),
                            reason: e.to_string(),
                        })
                    }
                }
                Some((chain, der))
            }
        };
        let roots = match ca {
            None => None,
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for c in certs("CA", path)? {
                    roots.add(c).map_err(|e| TlsError::BadFile {
                        what: "CA",
                        path: path.to_path_buf(),
                        reason: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                Some(Arc::new(roots))
            }
        };
        if identity.is_none() && roots.is_none() {
            return Ok(None);
        }
        let server = match &identity {
            None => None,
            Some((chain, der)) => {
                let builder = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(config_error)?;
                let builder = match &roots {
                    Some(roots) => builder.with_client_cert_verifier(
                        rustls::server::WebPkiClientVerifier::builder_with_provider(
                            roots.clone(),
                            provider(),
                        )
                        .build()
                        .map_err(|e| TlsError::Config(e.to_string()))?,
                    ),
                    None => builder.with_no_client_auth(),
                };
                Some(Arc::new(
                    builder
                        .with_single_cert(chain.clone(), der.clone_key())
                        .map_err(config_error)?,
                ))
            }
        };
        let client = match &roots {
            None => None,
            Some(roots) => {
                let builder = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(config_error)?
                    .with_root_certificates(roots.clone());
                Some(Arc::new(match &identity {
                    Some((chain, der)) => builder
                        .with_client_auth_cert(chain.clone(), der.clone_key())
                        .map_err(config_error)?,
                    None => builder.with_no_client_auth(),
                }))
            }
        };
        Ok(Some(MigrationTls {
            mutual: server.is_some() && roots.is_some(),
            server,
            client,
        }))
    }

    /// As a destination: the server side, when this VMM has a certificate.
    pub fn server(&self) -> Option<&Arc<ServerConfig>> {
        self.server.as_ref()
    }

    /// As a source: the client side, when this VMM has a CA.
    pub fn client(&self) -> Option<&Arc<ClientConfig>> {
        self.client.as_ref()
    }

    /// Whether a destination demands and checks the source's certificate.
    pub fn mutual(&self) -> bool {
        self.mutual
    }
}

/// The name a destination's certificate must carry: the host part of
/// HOST:PORT (an IP address, or a DNS name).
pub fn server_name(destination: &str) -> Result<ServerName<'static>, TlsError> {
    let host = destination
        .rsplit_once(':')
        .map_or(destination, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(destination.into()))
}

enum Conn {
    Plain(TcpStream),
    Server(Box<rustls::StreamOwned<ServerConnection, TcpStream>>),
    Client(Box<rustls::StreamOwned<ClientConnection, TcpStream>>),
}

/// One migration connection, TLS or plain. Clones are handles on the same
/// connection (a reader and a writer over one TLS session); each read or
/// write takes it for its duration.
#[derive(Clone)]
pub struct Channel {
    conn: Arc<Mutex<Conn>>,
    tcp: Arc<TcpStream>,
    tls: bool,
}

impl Channel {
    /// A connection without TLS.
    pub fn plain(tcp: TcpStream) -> std::io::Result<Channel> {
        Ok(Channel {
            tcp: Arc::new(tcp.try_clone()?),
            conn: Arc::new(Mutex::new(Conn::Plain(tcp))),
            tls: false,
        })
    }

    /// The socket underneath, for timeouts and shutdown.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Accept a TLS source on `tcp` within `limit`.
    pub fn accept(
        tcp: TcpStream,
        config: &Arc<ServerConfig>,
        peer: &str,
        limit: Duration,
    ) -> Result<Channel, TlsError> {
        let fail = |reason: String| TlsError::Handshake {
            peer: peer.to_string(),
            reason,
        };
        let conn = ServerConnection::new(config.clone()).map_err(|e| fail(e.to_string()))?;
        let stream = handshake(conn, tcp, limit).map_err(fail)?;
        Ok(Channel {
            tcp: Arc::new(stream.sock.try_clone().map_err(|e| fail(e.to_string()))?),
            conn: Arc::new(Mutex::new(Conn::Server(Box::new(stream)))),
            tls: true,
        })
    }

    /// Connect as a TLS source to `destination` over `tcp` within `limit`.
    pub fn connect(
        tcp: TcpStream,
        config: &Arc<ClientConfig>,
        destination: &str,
        limit: Duration,
    ) -> Result<Channel, TlsError> {
        let fail = |reason: String| TlsError::Handshake {
            peer: destination.to_string(),
            reason,
        };
        let conn = ClientConnection::new(config.clone(), server_name(destination)?)
            .map_err(|e| fail(e.to_string()))?;
        let stream = handshake(conn, tcp, limit).map_err(fail)?;
        Ok(Channel {
            tcp: Arc::new(stream.sock.try_clone().map_err(|e| fail(e.to_string()))?),
            conn: Arc::new(Mutex::new(Conn::Client(Box::new(stream)))),
            tls: true,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut dyn ReadWrite) -> T) -> T {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *c {
            Conn::Plain(s) => f(s),
            Conn::Server(s) => f(s.as_mut()),
            Conn::Client(s) => f(s.as_mut()),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.with(|c| c.read(buf))
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.with(|c| c.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.with(|c| c.flush())
    }
}

/// Run a handshake to its end under an overall deadline (the socket's
/// timeouts are set to what is left before each step); a peer that fails
/// it gets rustls's alert.
fn handshake<C, D>(
    mut conn: C,
    mut tcp: TcpStream,
    limit: Duration,
) -> Result<rustls::StreamOwned<C, TcpStream>, String>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    let start = Instant::now();
    while conn.is_handshaking() {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!("not done within {:.1} s", limit.as_secs_f64()));
        }
        tcp.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match conn.complete_io(&mut tcp) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err("the peer closed the connection".into())
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("not done within {:.1} s", limit.as_secs_f64()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err("the peer closed the connection (is it speaking TLS?)".into())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    // The last flight (a client's Finished) may still be queued.
    while conn.wants_write() {
        conn.write_tls(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::fs::PermissionsExt;

    /// A CA: its certificate and key.
    fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let k = rcgen::KeyPair::generate().unwrap();
        (p.self_signed(&k).unwrap(), k)
    }

    /// A host's certificate for `san`, signed by the CA: (cert PEM, key PEM).
    fn leaf(ca: &(rcgen::Certificate, rcgen::KeyPair), san: &str) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(vec![san.to_string()]).unwrap();
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &ca.0, &ca.1).unwrap();
        (c.pem(), k.serialize_pem())
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("vireo-tls-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
        fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// One host's files: (cert, key, ca).
    fn host(
        d: &Dir,
        name: &str,
        ca: &(rcgen::Certificate, rcgen::KeyPair),
    ) -> (PathBuf, PathBuf, PathBuf) {
        let (c, k) = leaf(ca, "127.0.0.1");
        (
            d.file(&format!("{name}.crt"), &c, 0o644),
            d.file(&format!("{name}.key"), &k, 0o600),
            d.file(&format!("{name}-ca.crt"), &ca.0.pem(), 0o644),
        )
    }

    #[test]
    fn bad_files_are_typed_errors_naming_the_file() {
        let d = Dir::new("files");
        let a = ca("A");
        let (cert, key, cafile) = host(&d, "a", &a);
        let missing = d.0.join("missing.crt");
        let e = MigrationTls::load(Some(&missing), Some(&key), None).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::Unreadable {
                    what: "certificate",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("missing.crt"), "{e}");
        let e = MigrationTls::load(Some(&cert), None, None).unwrap_err();
        assert!(matches!(e, TlsError::Incomplete(_)), "{e}");
        let e = MigrationTls::load(None, Some(&key), None).unwrap_err();
        assert!(matches!(e, TlsError::Incomplete(_)), "{e}");
        // Another host's key.
        let (_, other_key, _) = host(&d, "b", &a);
        let e = MigrationTls::load(Some(&cert), Some(&other_key), None).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("does not belong"), "{e}");
        // A key others may read.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = MigrationTls::load(Some(&cert), Some(&key), None).unwrap_err();
        assert!(matches!(e, TlsError::KeyExposed { mode: 0o644, .. }), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Files that hold something else.
        let junk = d.file("junk.pem", "not a certificate\n", 0o600);
        let e = MigrationTls::load(None, None, Some(&junk)).unwrap_err();
        assert!(matches!(e, TlsError::BadFile { what: "CA", .. }), "{e}");
        let e = MigrationTls::load(Some(&cert), Some(&junk), None).unwrap_err();
        assert!(matches!(e, TlsError::BadFile { what: "key", .. }), "{e}");
        let e = MigrationTls::load(Some(&key), Some(&key), None).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::BadFile {
                    what: "certificate",
                    ..
                }
            ),
            "{e}"
        );
        // What each combination gives.
        assert!(MigrationTls::load(None, None, None).unwrap().is_none());
        let t = MigrationTls::load(Some(&cert), Some(&key), None)
            .unwrap()
            .unwrap();
        assert!(t.server().is_some() && t.client().is_none() && !t.mutual());
        let t = MigrationTls::load(None, None, Some(&cafile))
            .unwrap()
            .unwrap();
        assert!(t.server().is_none() && t.client().is_some());
        let t = MigrationTls::load(Some(&cert), Some(&key), Some(&cafile))
            .unwrap()
            .unwrap();
        assert!(t.server().is_some() && t.client().is_some() && t.mutual());
    }

    #[test]
    fn server_names_come_from_the_destination() {
        assert!(matches!(
            server_name("127.0.0.1:7000"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]:7000"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("dest.example:7000"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("bad name!:7000").is_err());
    }

    /// Run a destination accepting one connection and a source connecting
    /// to it; what each end got.
    fn pair(
        server: &MigrationTls,
        client: &MigrationTls,
    ) -> (Result<String, TlsError>, Result<String, String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = l.local_addr().unwrap().to_string();
        let config = server.server().unwrap().clone();
        let t = std::thread::spawn(move || {
            let (s, peer) = l.accept().unwrap();
            let mut c = Channel::accept(s, &config, &peer.to_string(), Duration::from_secs(10))?;
            c.write_all(b"T").unwrap();
            c.flush().unwrap();
            let mut got = [0u8; 5];
            c.read_exact(&mut got)
                .map_err(|e| TlsError::Config(e.to_string()))?;
            Ok(String::from_utf8_lossy(&got).into_owned())
        });
        let s = TcpStream::connect(&to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let client = (|| {
            let mut c = Channel::connect(s, client.client().unwrap(), &to, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let mut t = [0u8; 1];
            c.read_exact(&mut t).map_err(|e| e.to_string())?;
            c.write_all(b"hello").map_err(|e| e.to_string())?;
            c.flush().map_err(|e| e.to_string())?;
            Ok(String::from_utf8_lossy(&t).into_owned())
        })();
        (t.join().unwrap(), client)
    }

    #[test]
    fn only_certificates_of_the_trusted_ca_pass() {
        let d = Dir::new("handshake");
        let (a, b) = (ca("A"), ca("B"));
        let (cert, key, ca_a) = host(&d, "dst", &a);
        let (scert, skey, _) = host(&d, "src", &a);
        let (bcert, bkey, ca_b) = host(&d, "other", &b);
        let dst = MigrationTls::load(Some(&cert), Some(&key), Some(&ca_a))
            .unwrap()
            .unwrap();
        // Mutual TLS with certificates of the same CA.
        let src = MigrationTls::load(Some(&scert), Some(&skey), Some(&ca_a))
            .unwrap()
            .unwrap();
        let (s, c) = pair(&dst, &src);
        assert_eq!(s.unwrap(), "hello");
        assert_eq!(c.unwrap(), "T");
        // A source whose certificate another CA signed is refused by the
        // destination, and learns so.
        let stranger = MigrationTls::load(Some(&bcert), Some(&bkey), Some(&ca_a))
            .unwrap()
            .unwrap();
        let (s, c) = pair(&dst, &stranger);
        let e = s.unwrap_err();
        assert!(matches!(e, TlsError::Handshake { .. }), "{e}");
        assert!(c.is_err(), "{c:?}");
        // A source without a certificate, to a destination that wants one.
        let anonymous = MigrationTls::load(None, None, Some(&ca_a))
            .unwrap()
            .unwrap();
        let (s, c) = pair(&dst, &anonymous);
        assert!(s.is_err() && c.is_err(), "{s:?} {c:?}");
        // A source that does not trust the destination's CA.
        let doubter = MigrationTls::load(Some(&scert), Some(&skey), Some(&ca_b))
            .unwrap()
            .unwrap();
        let (s, c) = pair(&dst, &doubter);
        let c = c.unwrap_err();
        assert!(c.contains("UnknownIssuer") || c.contains("unknown"), "{c}");
        assert!(s.is_err());
        // Server-only TLS: any source that trusts the CA.
        let open = MigrationTls::load(Some(&cert), Some(&key), None)
            .unwrap()
            .unwrap();
        let (s, c) = pair(&open, &anonymous);
        assert_eq!(s.unwrap(), "hello");
        assert_eq!(c.unwrap(), "T");
    }

    #[test]
    fn a_plain_client_fails_the_handshake_quickly() {
        let d = Dir::new("plain");
        let a = ca("A");
        let (cert, key, _) = host(&d, "dst", &a);
        let dst = MigrationTls::load(Some(&cert), Some(&key), None)
            .unwrap()
            .unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = l.local_addr().unwrap();
        let mut s = TcpStream::connect(to).unwrap();
        s.write_all(b"VIREOMIG\x03\x00\x00\x00{\"vireo\":1}")
            .unwrap();
        let (t, peer) = l.accept().unwrap();
        let start = Instant::now();
        let e = Channel::accept(
            t,
            dst.server().unwrap(),
            &peer.to_string(),
            Duration::from_secs(10),
        )
        .err()
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(e, TlsError::Handshake { .. }), "{e}");
        // Silence is bounded by the limit.
        let _quiet = TcpStream::connect(to).unwrap();
        let (t, peer) = l.accept().unwrap();
        let e = Channel::accept(
            t,
            dst.server().unwrap(),
            &peer.to_string(),
            Duration::from_millis(300),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("not done within"), "{e}");
    }
}
