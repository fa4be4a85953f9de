//! A real rumqttd broker for tests, behind a relay that can cut, freeze, partition and restart it.
//!
//! rumqttd cannot be stopped once started, so [`start_broker`] puts a small TCP relay in front
//! of it: clients connect to the relay's port, which stays the same for the whole test, and the
//! relay forwards to the broker of the moment. A restart starts a fresh broker (no retained
//! messages, no sessions) on a new internal port and cuts every relayed connection; the old
//! broker is left idle until the test process exits. Observers that must not be disturbed by
//! cuts connect to [`Broker::direct_port`] instead.
//!
//! The relay and the brokers run on their own threads and runtimes, so the helper works from
//! any test, on any runtime flavour, paused clock included.

#![allow(dead_code)] // Each test binary uses a different part of this helper.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// Largest payload the broker accepts: room for 1 MiB packets plus headers.
pub const MAX_PAYLOAD: usize = 2 * 1024 * 1024;

/// Test-only PKI, made once with openssl (P-256, valid until 2126): a CA, a server certificate
/// for `localhost` and 127.0.0.1, and a client certificate for `edge-1`. Never use outside tests.
pub const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBnTCCAUOgAwIBAgIUVoRC1PGb91ObunD0QUgzBFkpMvswCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZmxvdGlsbGEgdGVzdCBjYTAgFw0yNjEyMDMwOTE3MjZaGA8y
MTI2MTEwOTA5MTcyNlowGzEZMBcGA1UEAwwQZmxvdGlsbGEgdGVzdCBjYTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABP9s6GAhZiioi6fYjo3RFviXFK5JRCu1fygU
rs+Cg4EmFiF8tO2yXKd5w9+IHDs3BllnsKx+dgGGPkdwcZAal+6jYzBhMB0GA1Ud
DgQWBBRTMtyLheoAwvLpXEHAfIfp7DG8vjAfBgNVHSMEGDAWgBRTMtyLheoAwvLp
XEHAfIfp7DG8vjAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAKBggq
hkjOPQQDAgNIADBFAiEA4bp3xHvurtUzVzxL1IkUzr9Lf9BF+4b1EpnQwC+55AsC
IBtgKXMXn8svi7LuwopccXwNRM0pKiTRuvkQibVvy1z5
-----END CERTIFICATE-----\n";
const SERVER_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBxjCCAWygAwIBAgIUPewCYZuDYpe1/D0GYNY/9d4Fk+AwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZmxvdGlsbGEgdGVzdCBjYTAgFw0yNjEyMDMwOTE3MjZaGA8y
MTI2MTEwOTA5MTcyNlowFDESMBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0C
AQYIKoZIzj0DAQcDQgAE3DaC/t+qtd5qCSt6TodF/BP/9pLXuxIH/AY55lXuzyxC
IBl0/Ih4hMZEaFfa7pL7ttzWN90foPVdR5nqMq54gqOBkjCBjzAaBgNVHREEEzAR
gglsb2NhbGhvc3SHBH8AAAEwDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8EBAMCB4Aw
EwYDVR0lBAwwCgYIKwYBBQUHAwEwHQYDVR0OBBYEFOwsVzLxr19i8nOPj5XXbIw9
0TfNMB8GA1UdIwQYMBaAFFMy3IuF6gDC8ulcQcB8h+nsMby+MAoGCCqGSM49BAMC
A0gAMEUCIQD8QJQSgyYfIqBo46bJAG3imnZHr2fIfMTH69vkVozxxAIgNZ6SBMQm
wD/ZjVFaYjfsw5jTuBDZNda87HzLsBdZuos=
-----END CERTIFICATE-----\n";
const SERVER_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQguZzCAuE0Bw8HDm8h
DkyOmYTAlB+72H18gnx/R05J6ZyhRANCAATcNoL+36q13moJK3pOh0X8E//2kte7
Egf8BjnmVe7PLEIgGXT8iHiExkRoV9rukvu23NY33R+g9V1HmeoyrniC
-----END PRIVATE KEY-----\n";
const CLIENT_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBpTCCAUugAwIBAgIUPewCYZuDYpe1/D0GYNY/9d4Fk+EwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZmxvdGlsbGEgdGVzdCBjYTAgFw0yNjEyMDMwOTE3MjZaGA8y
MTI2MTEwOTA5MTcyNlowETEPMA0GA1UEAwwGZWRnZS0xMFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAEO5Gw4ZzPy9n3jrY9mRZB38lLNMBZcm5QnRVJtvbxQMtIsxY0
qgfNpFOG7cPnFdjVhw5piqgPX1h58hv5+WOWvKN1MHMwDAYDVR0TAQH/BAIwADAO
BgNVHQ8BAf8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwIwHQYDVR0OBBYEFOXC
va/oZw7jChxnShKO805CKNNBMB8GA1UdIwQYMBaAFFMy3IuF6gDC8ulcQcB8h+ns
Mby+MAoGCCqGSM49BAMCA0gAMEUCIQDN/OHyq1eLadl0lksBB4t7zd7EqiftjN1b
7jxuFGE6DQIgGhjt4lAd3rOC0Fs0YKvehWOljDQmQ2IlgzQ+86Sos2M=
-----END CERTIFICATE-----\n";
const CLIENT_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgmvBNGFLusO5cdF34
AeufA2Ako/Jk4g4XVkpi2hQyz4mhRANCAAQ7kbDhnM/L2feOtj2ZFkHfyUs0wFly
blCdFUm29vFAy0izFjSqB82kU4btw+cV2NWHDmmKqA9fWHnyG/n5Y5a8
-----END PRIVATE KEY-----\n";

/// How long [`start_broker`] waits for a broker to listen before trying another port.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running broker and its relay; see the module docs.
pub struct Broker {
    port: u16,
    control: Arc<Control>,
}

struct Control {
    backend: AtomicU16,
    /// The current broker's TLS listener (not relayed).
    tls_backend: AtomicU16,
    accepting: AtomicBool,
    /// Bumped to cut every relayed connection.
    cuts: watch::Sender<u64>,
    frozen: watch::Sender<bool>,
    /// Bytes from clients held back while frozen, since the start.
    held_upstream: watch::Sender<u64>,
}

/// Starts a broker (max payload [`MAX_PAYLOAD`], retained messages and wills on) behind a
/// relay on a free port of 127.0.0.1; returns the relay's port and the handle. The broker also
/// listens for TLS on [`Broker::tls_port`].
pub fn start_broker() -> (u16, Broker) {
    let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind relay port");
    let port = listener.local_addr().expect("relay address").port();
    listener
        .set_nonblocking(true)
        .expect("nonblocking relay listener");

    let (plain, tls) = spawn_rumqttd();
    let control = Arc::new(Control {
        backend: AtomicU16::new(plain),
        tls_backend: AtomicU16::new(tls),
        accepting: AtomicBool::new(true),
        cuts: watch::Sender::new(0),
        frozen: watch::Sender::new(false),
        held_upstream: watch::Sender::new(0),
    });

    let relay_control = control.clone();
    std::thread::Builder::new()
        .name(format!("relay-{port}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("relay runtime");
            runtime.block_on(run_relay(listener, relay_control));
        })
        .expect("spawn relay thread");

    (port, Broker { port, control })
}

impl Broker {
    /// The relay's port: what agents connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The current broker's own port; connections to it survive cuts and partitions, but not
    /// a restart.
    pub fn direct_port(&self) -> u16 {
        self.control.backend.load(Ordering::SeqCst)
    }

    /// The current broker's TLS port (server certificate signed by [`TEST_CA_PEM`], for
    /// `localhost` and 127.0.0.1); not behind the relay.
    pub fn tls_port(&self) -> u16 {
        self.control.tls_backend.load(Ordering::SeqCst)
    }

    /// `mqtt://127.0.0.1:{port}` of the relay.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Drops every relayed connection at once, as a network blip would; new ones are accepted.
    pub fn cut(&self) {
        self.control.cuts.send_modify(|n| *n += 1);
    }

    /// Drops every relayed connection and refuses new ones until [`Broker::heal`].
    pub fn partition(&self) {
        self.control.accepting.store(false, Ordering::SeqCst);
        self.cut();
    }

    /// Accepts connections again after [`Broker::partition`].
    pub fn heal(&self) {
        self.control.accepting.store(true, Ordering::SeqCst);
    }

    /// Replaces the broker by a fresh one (state lost) and cuts relayed connections. A
    /// partition stays in force.
    pub fn restart(&self) {
        let (plain, tls) = spawn_rumqttd();
        self.control.tls_backend.store(tls, Ordering::SeqCst);
        self.control.backend.store(plain, Ordering::SeqCst);
        self.cut();
    }

    /// Stops forwarding bytes and closes either way, like a hung network. Bytes read
    /// meanwhile are held and forwarded on [`Broker::thaw`]; a cut still drops everything.
    pub fn freeze(&self) {
        self.control.frozen.send_replace(true);
    }

    /// Forwards what was held and resumes.
    pub fn thaw(&self) {
        self.control.frozen.send_replace(false);
    }

    /// Waits until at least `bytes` sent by clients are being held by a freeze.
    pub async fn wait_held_upstream(&self, bytes: u64) {
        let mut held = self.control.held_upstream.subscribe();
        held.wait_for(|held| *held >= bytes)
            .await
            .expect("relay control is alive");
    }
}

/// Starts a rumqttd with a plain and a TLS listener on free ports; returns both once they
/// accept connections.
fn spawn_rumqttd() -> (u16, u16) {
    loop {
        // rumqttd binds the ports itself on its own threads, so free ones are picked here and
        // handed over; if another process takes one in between, the wait fails and we retry.
        let (plain, tls) = (free_port(), free_port());
        let config = rumqttd_config(plain, tls);
        std::thread::Builder::new()
            .name(format!("rumqttd-{plain}"))
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                let _ = broker.start();
            })
            .expect("spawn rumqttd thread");
        if wait_listening(plain) && wait_listening(tls) {
            return (plain, tls);
        }
    }
}

fn free_port() -> u16 {
    StdListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

/// Files of the test PKI, written once per test process.
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// The broker's certificate (for 127.0.0.1 and localhost), signed by the CA.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
}

/// Writes the test PKI to a folder of this process (once) and returns the paths.
pub fn tls_files() -> &'static TlsFiles {
    static FILES: OnceLock<TlsFiles> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("flotilla-test-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create test tls folder");
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write test tls file");
            path
        };
        TlsFiles {
            ca: write("ca.pem", TEST_CA_PEM),
            client_cert: write("client.pem", CLIENT_CERT_PEM),
            client_key: write("client.key", CLIENT_KEY_PEM),
            server_cert: write("server.pem", SERVER_CERT_PEM),
            server_key: write("server.key", SERVER_KEY_PEM),
        }
    })
}

/// Probes until the port accepts a TCP connection. There is no event to wait for: rumqttd does
/// not report when it listens.
fn wait_listening(port: u16) -> bool {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while Instant::now() < deadline {
        if StdStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn rumqttd_config(port: u16, tls_port: u16) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: format!("v4-{port}"),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: connections.clone(),
    };
    let files = tls_files();
    let tls_server = ServerSettings {
        name: format!("v4-tls-{tls_port}"),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, tls_port)),
        tls: Some(TlsConfig::Rustls {
            capath: None,
            certpath: files.server_cert.display().to_string(),
            keypath: files.server_key.display().to_string(),
        }),
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([
            ("v4".to_owned(), server),
            ("v4-tls".to_owned(), tls_server),
        ])),
        ..Config::default()
    }
}

async fn run_relay(listener: StdListener, control: Arc<Control>) {
    let listener = TcpListener::from_std(listener).expect("relay listener on tokio");
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if !control.accepting.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let span = tracing::info_span!(
            "test_relay_connection",
            backend = control.backend.load(Ordering::SeqCst)
        );
        tokio::spawn(relay_connection(client, control.clone()).instrument(span));
    }
}

async fn relay_connection(client: TcpStream, control: Arc<Control>) {
    let mut cuts = control.cuts.subscribe();
    cuts.borrow_and_update();
    let backend = control.backend.load(Ordering::SeqCst);
    let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, backend)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();

    // Either direction ending, or a cut, ends the relay; dropping the halves closes both sockets.
    let cut = tokio::select! {
        _ = pump(&mut client_read, &mut server_write, &control, true) => false,
        _ = pump(&mut server_read, &mut client_write, &control, false) => false,
        _ = cuts.changed() => true,
    };
    // A hung network does not pass on a close either: hold it until thawed or cut.
    if !cut {
        let mut frozen = control.frozen.subscribe();
        tokio::select! {
            _ = frozen.wait_for(|frozen| !*frozen) => {}
            _ = cuts.changed() => {}
        }
    }
}

/// Copies one direction, holding bytes back while frozen but still noticing a close.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    control: &Control,
    upstream: bool,
) {
    let mut frozen = control.frozen.subscribe();
    let mut held = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if !*frozen.borrow_and_update() && !held.is_empty() {
            if to.write_all(&held).await.is_err() {
                return;
            }
            held.clear();
        }
        tokio::select! {
            read = from.read(&mut buffer) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if *frozen.borrow() {
                    held.extend_from_slice(&buffer[..n]);
                    if upstream {
                        control.held_upstream.send_modify(|total| *total += n as u64);
                    }
                } else if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
            _ = frozen.changed() => {}
        }
    }
}

/// A plain MQTT client for checking what the broker carries.
pub struct Observer {
    /// The client, for publishing.
    pub client: AsyncClient,
    messages: mpsc::UnboundedReceiver<Publish>,
}

impl Observer {
    /// Connects to `port` as `id`, subscribes to `filters` at QoS 1 and returns once the
    /// broker has acknowledged every subscription.
    pub async fn connect(port: u16, id: &str, filters: &[&str]) -> Self {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_max_packet_size(MAX_PAYLOAD, MAX_PAYLOAD);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        for filter in filters {
            client
                .subscribe(*filter, QoS::AtLeastOnce)
                .await
                .expect("queue subscribe");
        }

        let (messages_tx, messages) = mpsc::unbounded_channel();
        let (subacks_tx, mut subacks) = watch::channel(0usize);
        let span = tracing::info_span!("test_observer", id);
        tokio::spawn(
            async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(publish))) => {
                            if messages_tx.send(publish).is_err() {
                                return;
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks_tx.send_modify(|n| *n += 1)
                        }
                        Ok(_) => {}
                        // Dropping the sender makes `next` fail the test with a clear message.
                        Err(_) => return,
                    }
                }
            }
            .instrument(span),
        );

        let wanted = filters.len();
        tokio::time::timeout(Duration::from_secs(20), subacks.wait_for(|n| *n >= wanted))
            .await
            .expect("observer subscribed in time")
            .expect("observer task alive");
        Self { client, messages }
    }

    /// Plays the control plane's part: publishes its retained state, `online` or not, for the
    /// process started at `epoch`.
    pub async fn announce_control_plane(&self, online: bool, epoch: u64) {
        let state = flotilla_shared::wire::ControlPlaneState { online, epoch };
        let payload = flotilla_shared::wire::Envelope::new("control-plane", epoch, epoch, state);
        self.client
            .publish(
                flotilla_shared::wire::topics::control_plane_state(),
                QoS::AtLeastOnce,
                true,
                payload.encode(),
            )
            .await
            .expect("queue the control-plane state");
    }

    /// Whether a message arrives within `quiet`; for checking that something is held back.
    pub async fn stays_quiet(&mut self, quiet: Duration) -> bool {
        tokio::time::timeout(quiet, self.messages.recv())
            .await
            .is_err()
    }

    /// The next message, failing the test after 20 seconds.
    pub async fn next(&mut self) -> Publish {
        tokio::time::timeout(Duration::from_secs(20), self.messages.recv())
            .await
            .expect("observer received a message in time")
            .expect("observer connection alive")
    }
}
