//! Turns the `[broker]` config into rumqttc options: address, TLS, credentials, limits.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::LinkError;
use crate::config::BrokerConfig;

/// Where a broker URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrokerAddress {
    /// `mqtts://`.
    pub tls: bool,
    /// Host name or address; IPv6 literals keep their brackets.
    pub host: String,
    /// Port; 1883 or 8883 when the URL names none.
    pub port: u16,
}

/// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
pub(crate) fn parse_broker_url(url: &str) -> Result<BrokerAddress, LinkError> {
    let invalid = |reason: &str| LinkError::BrokerUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };

    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid("missing scheme"))?;
    let tls = match scheme {
        "mqtt" => false,
        "mqtts" => true,
        _ => return Err(invalid("scheme must be mqtt or mqtts")),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(invalid("expected only host and port after the scheme"));
    }

    let (host, port) = match authority.rsplit_once(':') {
        // A colon inside brackets belongs to an IPv6 literal, not to a port.
        Some((host, port)) if !port.contains(']') => {
            let port: u16 = port
                .parse()
                .map_err(|_| invalid("port is not a number in 1-65535"))?;
            (host, port)
        }
        _ => (authority, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || port == 0 {
        return Err(invalid("host and port must not be empty or zero"));
    }

    Ok(BrokerAddress {
        tls,
        host: host.to_owned(),
        port,
    })
}

/// Options for one client's connections (an agent's, or the control plane's on an external
/// broker), without a Last Will (an agent's changes per session).
pub fn mqtt_options(
    agent_id: &str,
    broker: &BrokerConfig,
    max_packet_bytes: usize,
) -> Result<MqttOptions, LinkError> {
    let address = parse_broker_url(&broker.url)?;
    let keep_alive_secs = u16::try_from(broker.keep_alive_secs)
        .map_err(|_| LinkError::KeepAlive(broker.keep_alive_secs))?;

    let mut options = MqttOptions::new(agent_id, address.host.clone(), address.port);
    options
        .set_keep_alive(Duration::from_secs(u64::from(keep_alive_secs)))
        .set_clean_session(true)
        .set_max_packet_size(max_packet_bytes, max_packet_bytes);

    match (&broker.username, &broker.password) {
        (Some(user), password) => {
            options.set_credentials(user.clone(), password.clone().unwrap_or_default());
        }
        (None, Some(_)) => return Err(LinkError::PasswordWithoutUser),
        (None, None) => {}
    }

    if address.tls {
        let tls = tls_config(broker)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }

    Ok(options)
}

/// A rustls client config trusting `ca_file`, with the client certificate when one is set.
fn tls_config(broker: &BrokerConfig) -> Result<ClientConfig, LinkError> {
    let ca_file = broker.ca_file.as_deref().ok_or(LinkError::MissingCaFile)?;
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file, "ca_file")? {
        roots.add(cert).map_err(|source| LinkError::Tls {
            path: ca_file.to_owned(),
            source,
        })?;
    }

    // The ring provider is named explicitly: rumqttc's defaults also compile in aws-lc-rs, and
    // with two providers present rustls refuses to pick one by itself.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| LinkError::Tls {
            path: ca_file.to_owned(),
            source,
        })?
        .with_root_certificates(roots);

    match (&broker.client_cert, &broker.client_key) {
        (Some(cert_file), Some(key_file)) => {
            let certs = read_certs(cert_file, "client_cert")?;
            let key = read_key(key_file)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|source| LinkError::Tls {
                    path: cert_file.clone(),
                    source,
                })
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(LinkError::ClientCertWithoutKey),
    }
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|source| LinkError::ReadPem {
        what,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    let pem = read_pem(path, what)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| LinkError::ReadPem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(LinkError::NoPemItem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, LinkError> {
    let what = "client_key";
    let pem = read_pem(path, what)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| LinkError::ReadPem {
            what,
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| LinkError::NoPemItem {
            what,
            path: path.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(tls: bool, host: &str, port: u16) -> BrokerAddress {
        BrokerAddress {
            tls,
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn urls_give_host_port_and_tls() {
        assert_eq!(
            parse_broker_url("mqtt://10.0.0.5:1884").unwrap(),
            address(false, "10.0.0.5", 1884)
        );
        assert_eq!(
            parse_broker_url("mqtts://broker.example").unwrap(),
            address(true, "broker.example", 8883)
        );
        assert_eq!(
            parse_broker_url("mqtt://broker/").unwrap(),
            address(false, "broker", 1883)
        );
        assert_eq!(
            parse_broker_url("mqtt://[::1]:1999").unwrap(),
            address(false, "[::1]", 1999)
        );
        assert_eq!(
            parse_broker_url("mqtt://[::1]").unwrap(),
            address(false, "[::1]", 1883)
        );
    }

    #[test]
    fn malformed_urls_are_refused_with_the_url_named() {
        for url in [
            "broker:1883",
            "http://broker",
            "mqtt://",
            "mqtt://b:x",
            "mqtt://b:0",
            "mqtt://b:70000",
            "mqtt://u@b",
            "mqtt://b/path",
        ] {
            let err = parse_broker_url(url).unwrap_err().to_string();
            assert!(err.contains(url), "{url}: {err}");
        }
    }

    #[test]
    fn tls_needs_a_readable_ca_file() {
        let mut broker = BrokerConfig {
            url: "mqtts://broker:8883".into(),
            ..BrokerConfig::default()
        };
        assert!(matches!(
            mqtt_options("edge-1", &broker, 1024),
            Err(LinkError::MissingCaFile)
        ));

        broker.ca_file = Some("/nonexistent/ca.pem".into());
        let err = mqtt_options("edge-1", &broker, 1024)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        broker.ca_file = Some(empty.clone());
        let err = mqtt_options("edge-1", &broker, 1024).unwrap_err();
        assert!(matches!(err, LinkError::NoPemItem { .. }), "{err}");
    }

    #[test]
    fn password_without_user_and_huge_keep_alive_are_refused() {
        let broker = BrokerConfig {
            password: Some("secret".into()),
            ..BrokerConfig::default()
        };
        assert!(matches!(
            mqtt_options("edge-1", &broker, 1024),
            Err(LinkError::PasswordWithoutUser)
        ));

        let broker = BrokerConfig {
            keep_alive_secs: 70_000,
            ..BrokerConfig::default()
        };
        assert!(matches!(
            mqtt_options("edge-1", &broker, 1024),
            Err(LinkError::KeepAlive(70_000))
        ));
    }

    #[test]
    fn plain_options_carry_limits_and_credentials() {
        let broker = BrokerConfig {
            url: "mqtt://127.0.0.1:1999".into(),
            username: Some("edge-1".into()),
            password: Some("pw".into()),
            keep_alive_secs: 7,
            ..BrokerConfig::default()
        };
        let options = mqtt_options("edge-1", &broker, 1 << 20).unwrap();
        assert_eq!(options.broker_address(), ("127.0.0.1".to_owned(), 1999));
        assert_eq!(options.keep_alive(), Duration::from_secs(7));
        assert_eq!(options.max_packet_size(), 1 << 20);
        assert_eq!(
            options.credentials().map(|login| login.username),
            Some("edge-1".to_owned())
        );
        assert!(options.clean_session());
    }
}
