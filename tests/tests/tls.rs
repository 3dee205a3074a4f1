//! TLS and mutual TLS, with certificates made at test time, and configuration errors.

use std::process::Command;

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::platform::tls::{ClientTls, ServerTls};
use integration_tests::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    rogue_client: (String, String),
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA");
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(names: &[&str], issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("params");
    let cert = params.signed_by(&key, issuer).expect("leaf");
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let (ca_pem, issuer) = ca("test CA");
    let (_, rogue) = ca("rogue CA");
    Pki {
        ca_pem,
        server: leaf(&["localhost", "127.0.0.1"], &issuer),
        client: leaf(&["billing-svc"], &issuer),
        rogue_client: leaf(&["intruder"], &rogue),
    }
}

fn server_tls(pki: &Pki, mutual: bool) -> ServerTls {
    ServerTls {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: mutual.then(|| pki.ca_pem.clone().into_bytes()),
    }
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    pki: &Pki,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)?
        .connect()
        .await
}

async fn signs_up(channel: Channel) -> Result<(), tonic::Status> {
    let mut client = dpb::directory_service_client::DirectoryServiceClient::new(channel);
    client
        .create_directory(dpb::CreateDirectoryRequest {
            display_name: "TLS".into(),
            domain_prefix: format!("tls{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            admin_user_name: "admin".into(),
            admin_display_name: "Admin".into(),
            admin_password: PASSWORD.into(),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn tls_serves_only_tls_clients() {
    let pki = pki();
    let db = TestDb::sqlite();
    let mut config = directory_config(&db);
    config.serve.tls = Some(server_tls(&pki, false));
    let server = DirectoryServer::start_with(config).await;

    let channel = tls_channel(server.addr, &pki, None)
        .await
        .expect("TLS handshake");
    signs_up(channel).await.expect("a call over TLS");

    // A plaintext client gets nowhere.
    let plain = Channel::from_shared(server.url())
        .expect("url")
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(
            signs_up(plain).await.is_err(),
            "plaintext must not be served"
        );
    }
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_trusted_ca() {
    let pki = pki();
    let db = TestDb::sqlite();
    let mut config = directory_config(&db);
    config.serve.tls = Some(server_tls(&pki, true));
    let server = DirectoryServer::start_with(config).await;

    let trusted = tls_channel(server.addr, &pki, Some(&pki.client))
        .await
        .expect("handshake");
    signs_up(trusted)
        .await
        .expect("a client with a trusted certificate is served");

    for identity in [None, Some(&pki.rogue_client)] {
        let refused = match tls_channel(server.addr, &pki, identity).await {
            Err(_) => true,
            Ok(channel) => signs_up(channel).await.is_err(),
        };
        assert!(
            refused,
            "client without a trusted certificate must be refused"
        );
    }
}

#[tokio::test]
async fn billing_reaches_the_directory_over_mutual_tls_and_serves_tls_itself() {
    let pki = pki();
    let ddb = TestDb::sqlite();
    let bdb = TestDb::sqlite();
    let mut dconfig = directory_config(&ddb);
    dconfig.serve.tls = Some(server_tls(&pki, true));
    let directory = DirectoryServer::start_with(dconfig).await;

    let mut bconfig = billing_config(
        &bdb,
        &format!("https://localhost:{}", directory.addr.port()),
    );
    bconfig.directory_tls = Some(ClientTls {
        ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        identity: Some((
            pki.client.0.clone().into_bytes(),
            pki.client.1.clone().into_bytes(),
        )),
    });
    bconfig.serve.tls = Some(server_tls(&pki, false));
    let billing = BillingServer::start_with(bconfig).await;

    let mut dir = dpb::directory_service_client::DirectoryServiceClient::new(
        tls_channel(directory.addr, &pki, Some(&pki.client))
            .await
            .expect("directory over mTLS"),
    );
    let tenant = sign_up(&mut dir, "contoso").await;
    let mut bill = BillingServiceClient::new(
        tls_channel(billing.addr, &pki, None)
            .await
            .expect("billing over TLS"),
    );
    let bought = bill
        .create_subscription(authed(
            bpb::CreateSubscriptionRequest {
                offer_id: "azure-pay-as-you-go".into(),
                display_name: "over TLS".into(),
                seats: 0,
                request_id: String::new(),
            },
            &tenant.token,
        ))
        .await
        .expect("a purchase authorised over mutual TLS")
        .into_inner();
    assert_eq!(bought.directory_id, tenant.directory.id);

    // Without its client certificate, billing cannot reach the directory: UNAVAILABLE.
    let bdb2 = TestDb::sqlite();
    let mut no_identity = billing_config(
        &bdb2,
        &format!("https://localhost:{}", directory.addr.port()),
    );
    no_identity.directory_tls = Some(ClientTls {
        ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        identity: None,
    });
    no_identity.directory_timeout = std::time::Duration::from_millis(500);
    let lonely = BillingServer::start_with(no_identity).await;
    let mut bill = lonely.client().await;
    expect_err(
        bill.create_subscription(authed(
            bpb::CreateSubscriptionRequest {
                offer_id: "azure-pay-as-you-go".into(),
                display_name: "x".into(),
                seats: 0,
                request_id: String::new(),
            },
            &tenant.token,
        ))
        .await,
        tonic::Code::Unavailable,
        "DIRECTORY_UNAVAILABLE",
    );
}

#[test]
fn invalid_configuration_exits_2_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("cfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello").expect("write");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca("some CA").0).expect("write");
    let ca_file = ca_file.display().to_string();
    let db = format!("sqlite://{}/d.db", dir.display());
    let not_pem = not_pem.display().to_string();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "directory-svc",
            vec!["--database-url", "mysql://x/y"],
            "sqlite:// or postgres://",
        ),
        (
            "directory-svc",
            vec!["--database-url", &db, "--listen", "nowhere"],
            "HOST:PORT",
        ),
        (
            "directory-svc",
            vec!["--database-url", &db, "--tls-cert", &not_pem],
            "go together",
        ),
        (
            "directory-svc",
            vec![
                "--database-url",
                &db,
                "--tls-cert",
                &not_pem,
                "--tls-key",
                &not_pem,
            ],
            "not PEM",
        ),
        (
            "directory-svc",
            vec![
                "--database-url",
                &db,
                "--tls-cert",
                "/nonexistent.pem",
                "--tls-key",
                "/nonexistent.pem",
            ],
            "cannot read",
        ),
        ("directory-svc", vec!["--token-ttl-secs", "0"], "0"),
        (
            "billing-svc",
            vec!["--database-url", &db, "--directory-url", "ftp://x"],
            "http:// or https://",
        ),
        (
            "billing-svc",
            vec![
                "--database-url",
                &db,
                "--directory-url",
                "https://localhost:1",
            ],
            "--directory-ca",
        ),
        (
            "billing-svc",
            vec!["--database-url", &db, "--directory-ca", &ca_file],
            "https://",
        ),
        (
            "billing-svc",
            vec![
                "--database-url",
                &db,
                "--directory-ca",
                &not_pem,
                "--directory-url",
                "https://x:1",
            ],
            "not PEM",
        ),
        ("billing-svc", vec!["--directory-timeout-ms", "abc"], "abc"),
    ];
    for (binary_name, args, says) in cases {
        let out = Command::new(integration_tests::process::binary(binary_name))
            .args(&args)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{binary_name} {args:?}: {stderr}"
        );
        assert!(
            stderr.contains(says),
            "{binary_name} {args:?} should say {says:?}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
