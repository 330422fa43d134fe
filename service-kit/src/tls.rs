//! gRPC server TLS and optional mTLS, with certificates re-read when their
//! files change.
//!
//! tonic's `ServerTlsConfig` is fixed for the life of the server, but
//! Kubernetes rotates mounted secrets in place. So the server accepts TCP
//! itself and hands tonic already-encrypted streams
//! (`serve_with_incoming`): each new connection is handshaken with the
//! rustls `ServerConfig` current at that moment, and a watcher re-reads the
//! files every [`RELOAD_INTERVAL`], swapping in a new configuration when
//! their contents changed and parse. Existing connections keep the
//! certificate they started with; a half-written or mismatched update is
//! logged and ignored (the previous certificate stays) until the files are
//! consistent again.
//!
//! Handshakes run concurrently and are bounded in time
//! ([`HANDSHAKE_TIMEOUT`]) and number ([`MAX_PENDING_HANDSHAKES`]), so a
//! client that opens a connection and never speaks cannot hold up others.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};
use tonic::transport::server::Connected;

/// How often the certificate files are re-read.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; further connections wait in the
/// kernel's accept queue.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// The variable naming the server certificate chain (PEM).
pub const CERT_VAR: &str = "IGNY8_TLS_CERT_FILE";
/// The variable naming the server private key (PEM: PKCS#8, PKCS#1 or SEC1).
pub const KEY_VAR: &str = "IGNY8_TLS_KEY_FILE";
/// The variable naming the CA bundle client certificates must chain to
/// (PEM); set it to require client certificates (mTLS).
pub const CLIENT_CA_VAR: &str = "IGNY8_TLS_CLIENT_CA_FILE";

/// Where the TLS material lives (`IGNY8_TLS_*`). Paths are re-read while the
/// server runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `IGNY8_TLS_CERT_FILE`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `IGNY8_TLS_KEY_FILE`: the leaf's private key.
    pub key: PathBuf,
    /// `IGNY8_TLS_CLIENT_CA_FILE`: when set, every client must present a
    /// certificate that chains to one of these CAs.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The TLS settings from the three variables: `None` when none is set.
    /// A key without a certificate (or the reverse), or a client CA without
    /// server TLS, is an error naming the variables.
    pub fn from_vars(
        cert: Option<String>,
        key: Option<String>,
        client_ca: Option<String>,
    ) -> Result<Option<Self>, String> {
        match (cert, key, client_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), client_ca) => Ok(Some(Self {
                cert: cert.into(),
                key: key.into(),
                client_ca: client_ca.map(PathBuf::from),
            })),
            (None, None, Some(_)) => Err(format!(
                "{CLIENT_CA_VAR} is set but {CERT_VAR} and {KEY_VAR} are not: client \
                 certificates (mTLS) need server TLS; set all three, or unset {CLIENT_CA_VAR}"
            )),
            (Some(_), None, _) => Err(format!(
                "{CERT_VAR} is set but {KEY_VAR} is not: set both to serve TLS, or neither for plaintext"
            )),
            (None, Some(_), _) => Err(format!(
                "{KEY_VAR} is set but {CERT_VAR} is not: set both to serve TLS, or neither for plaintext"
            )),
        }
    }
}

/// The bytes of the three files as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Material {
    async fn read(files: &TlsFiles) -> Result<Self, String> {
        async fn read(var: &str, path: &Path) -> Result<Vec<u8>, String> {
            tokio::fs::read(path)
                .await
                .map_err(|e| format!("{var}: cannot read {}: {e}", path.display()))
        }
        Ok(Self {
            cert: read(CERT_VAR, &files.cert).await?,
            key: read(KEY_VAR, &files.key).await?,
            client_ca: match &files.client_ca {
                Some(path) => Some(read(CLIENT_CA_VAR, path).await?),
                None => None,
            },
        })
    }

    /// A rustls server configuration from the material, or what is wrong
    /// with it, naming the variable.
    fn server_config(&self, files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = parse_certs(CERT_VAR, &files.cert, &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            format!(
                "{KEY_VAR}: {} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                files.key.display()
            )
        })?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?;
        let builder = match (&self.client_ca, &files.client_ca) {
            (Some(pem), Some(path)) => {
                let mut roots = RootCertStore::empty();
                for cert in parse_certs(CLIENT_CA_VAR, path, pem)? {
                    roots.add(cert).map_err(|e| {
                        format!(
                            "{CLIENT_CA_VAR}: {} holds a certificate that is not a usable CA: {e}",
                            path.display()
                        )
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| format!("{CLIENT_CA_VAR}: {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| key_error(files, e))?;
        // gRPC clients (grpc-go, grpcio) insist on negotiating h2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn key_error(files: &TlsFiles, e: rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{KEY_VAR}: the private key in {} does not match the certificate in {CERT_VAR} ({})",
            files.key.display(),
            files.cert.display()
        ),
        e => format!(
            "{KEY_VAR} / {CERT_VAR}: cannot use the key {} with the certificate {}: {e}",
            files.key.display(),
            files.cert.display()
        ),
    }
}

fn parse_certs(var: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{var}: {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{var}: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The TLS configuration new connections are accepted with, kept current by
/// [`ReloadingTls::watch`].
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<(Material, Arc<ServerConfig>)>,
}

impl ReloadingTls {
    /// Reads and checks the files once; any problem (a missing file, no
    /// certificate, a key that does not match, an unusable client CA) is an
    /// error naming the variable, for start-up to refuse.
    pub async fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let material = Material::read(&files).await?;
        let config = material.server_config(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new((material, config)),
        }))
    }

    /// True when client certificates are required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(Arc::clone(&current.1))
    }

    /// Re-reads the files once: swaps in the new configuration when the
    /// contents changed and are usable. Returns true when it swapped.
    async fn reload(&self, last_rejected: &mut Option<Material>) -> bool {
        let material = match Material::read(&self.files).await {
            Ok(m) => m,
            Err(e) => {
                // Mid-rotation a file can be briefly absent; keep serving.
                tracing::debug!(error = %e, "TLS files unreadable; keeping the current certificate");
                return false;
            }
        };
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.0 == material {
                return false;
            }
        }
        if last_rejected.as_ref() == Some(&material) {
            return false;
        }
        match material.server_config(&self.files) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = (material, config);
                *last_rejected = None;
                tracing::info!(
                    cert = %self.files.cert.display(),
                    "TLS certificate files changed: new connections use the new certificate"
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "TLS certificate files changed but cannot be used; keeping the previous certificate"
                );
                *last_rejected = Some(material);
                false
            }
        }
    }

    /// Re-reads the files every [`RELOAD_INTERVAL`], forever.
    pub async fn watch(self: Arc<Self>) {
        let mut last_rejected = None;
        loop {
            tokio::time::sleep(RELOAD_INTERVAL).await;
            self.reload(&mut last_rejected).await;
        }
    }
}

/// A connection as tonic sees it: plaintext, or TLS over the same kind of
/// stream.
#[derive(Debug)]
pub enum MaybeTls<IO> {
    /// No TLS configured.
    Plain(IO),
    /// A completed TLS handshake.
    Tls(Box<TlsStream<IO>>),
}

impl<IO: Connected> Connected for MaybeTls<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            MaybeTls::Plain(io) => io.connect_info(),
            MaybeTls::Tls(tls) => tls.get_ref().0.connect_info(),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_read(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(io) => io.is_write_vectored(),
            MaybeTls::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_flush(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_shutdown(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Aborts the certificate watcher when the stream of connections is dropped
/// (the server stopped).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The connections tonic serves: `inner`'s as they are without TLS, or
/// after a completed handshake with it.
pub struct Incoming<S, IO> {
    inner: Pin<Box<S>>,
    inner_done: bool,
    tls: Option<Arc<ReloadingTls>>,
    handshakes: FuturesUnordered<BoxFuture<'static, Option<TlsStream<IO>>>>,
    _watcher: Option<AbortOnDrop>,
}

impl<S, IO> std::fmt::Debug for Incoming<S, IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("tls", &self.tls.is_some())
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

/// Wraps a stream of accepted connections: with `tls`, each is handshaken
/// (concurrently, bounded) before tonic sees it, and the certificate files
/// are watched for as long as the stream lives.
pub fn incoming<S, IO, E>(inner: S, tls: Option<Arc<ReloadingTls>>) -> Incoming<S, IO>
where
    S: Stream<Item = Result<IO, E>>,
{
    let watcher = tls
        .as_ref()
        .map(|tls| AbortOnDrop(tokio::spawn(Arc::clone(tls).watch())));
    Incoming {
        inner: Box::pin(inner),
        inner_done: false,
        tls,
        handshakes: FuturesUnordered::new(),
        _watcher: watcher,
    }
}

impl<S, IO, E> Stream for Incoming<S, IO>
where
    S: Stream<Item = Result<IO, E>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Item = Result<MaybeTls<IO>, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(tls) = &this.tls else {
            return this
                .inner
                .as_mut()
                .poll_next(cx)
                .map(|item| item.map(|r| r.map(MaybeTls::Plain)));
        };
        // Take every connection waiting (up to the bound) and start its
        // handshake; they progress together below.
        while !this.inner_done && this.handshakes.len() < MAX_PENDING_HANDSHAKES {
            match this.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(io))) => {
                    let accept = tls.acceptor().accept(io);
                    this.handshakes.push(Box::pin(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                            Ok(Ok(stream)) => Some(stream),
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake timed out");
                                None
                            }
                        }
                    }));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.inner_done = true,
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_next_unpin(cx) {
                Poll::Ready(Some(Some(stream))) => {
                    return Poll::Ready(Some(Ok(MaybeTls::Tls(Box::new(stream)))));
                }
                Poll::Ready(Some(None)) => continue,
                Poll::Ready(None) if this.inner_done => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_settings_name_the_missing_variable() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(TlsFiles::from_vars(None, None, None), Ok(None));
        let err = TlsFiles::from_vars(s("/c"), None, None).unwrap_err();
        assert!(err.contains(KEY_VAR), "{err}");
        let err = TlsFiles::from_vars(None, s("/k"), None).unwrap_err();
        assert!(err.contains(CERT_VAR), "{err}");
        let err = TlsFiles::from_vars(None, None, s("/ca")).unwrap_err();
        assert!(
            err.contains(CLIENT_CA_VAR) && err.contains(CERT_VAR),
            "{err}"
        );
        let files = TlsFiles::from_vars(s("/c"), s("/k"), s("/ca"))
            .unwrap()
            .unwrap();
        assert_eq!(files.client_ca.as_deref(), Some(Path::new("/ca")));
    }
}
