//! The embedded MQTT broker: rumqttd on its own threads, so one command gives a working hub.
//!
//! rumqttd keeps nothing on disk (no retained messages or sessions survive a restart); the
//! server therefore republishes every desired state whenever its own client connects, and
//! agents announce themselves again on reconnect.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

use super::config::{MqttConfig, MAX_PACKET_BYTES};

/// How long to wait for the broker's listeners to accept connections.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the embedded broker and waits until its listeners accept connections.
pub fn start(mqtt: &MqttConfig) -> Result<()> {
    // rumqttd exits the process's thread with only a log line when it cannot bind, so the
    // address is checked here first for a clear error.
    for addr in listen_addresses(mqtt) {
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen for MQTT on {addr}"))?;
    }
    let config = rumqttd_config(mqtt);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .context("cannot start the broker thread")?;
    for addr in listen_addresses(mqtt) {
        wait_listening(addr)?;
    }
    Ok(())
}

fn listen_addresses(mqtt: &MqttConfig) -> Vec<SocketAddr> {
    let mut out = vec![mqtt.listen];
    out.extend(mqtt.tls.as_ref().map(|t| t.listen));
    out
}

/// rumqttd does not say when it listens; probe until it does.
fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the embedded MQTT broker did not start listening on {addr}")
}

fn rumqttd_config(mqtt: &MqttConfig) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PACKET_BYTES,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let mut servers = HashMap::from([(
        "mqtt".to_owned(),
        ServerSettings {
            name: "mqtt".into(),
            listen: mqtt.listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: connections.clone(),
        },
    )]);
    if let Some(tls) = &mqtt.tls {
        servers.insert(
            "mqtts".to_owned(),
            ServerSettings {
                name: "mqtts".into(),
                listen: tls.listen,
                tls: Some(TlsConfig::Rustls {
                    capath: None,
                    certpath: tls.cert_file.display().to_string(),
                    keypath: tls.key_file.display().to_string(),
                }),
                next_connection_delay_ms: 1,
                connections,
            },
        );
    }
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 500,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(servers),
        ..Config::default()
    }
}
