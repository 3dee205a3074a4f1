//! The README's grpcurl walk-through, run verbatim against fresh servers: it never rots.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A folder holding grpcurl: `GRPCURL_DIR`, the PATH, or the team's installer.
fn grpcurl_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("GRPCURL_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.join("grpcurl").exists())
    {
        return Some(dir);
    }
    if let Some(dir) = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|d| d.join("grpcurl").exists()))
    {
        return Some(dir);
    }
    let installer = repo().join("../shared/tools/install-grpcurl");
    let dest = repo().join("target/tools");
    if installer.exists() {
        let ok = Command::new("bash")
            .arg(&installer)
            .arg(&dest)
            .status()
            .is_ok_and(|s| s.success());
        if ok && dest.join("grpcurl").exists() {
            return Some(dest);
        }
    }
    None
}

fn has(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn the_readme_walkthrough_works_as_written() {
    let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let Some(grpcurl) = grpcurl_dir() else {
        assert!(!required, "grpcurl is required in CI");
        eprintln!("skipping: no grpcurl (set GRPCURL_DIR or run ../shared/tools/install-grpcurl)");
        return;
    };
    if !has("jq") {
        assert!(!required, "jq is required in CI");
        eprintln!("skipping: no jq");
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let walkthrough = readme
        .split("```sh\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("directory.v1.DirectoryService/CreateDirectory"))
        .expect("the grpcurl walk-through block");

    let ddb = TestDb::sqlite();
    let bdb = TestDb::sqlite();
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let path = format!(
        "{}:{}",
        grpcurl.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = format!("set -euo pipefail\n{walkthrough}");
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", &path)
        .env("D", directory.addr.to_string())
        .env("B", billing.addr.to_string())
        .current_dir(Path::new(&std::env::temp_dir()))
        .output()
        .await
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the walk-through failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "directory.v1.DirectoryService",
        "\"initialDomain\": \"contoso.onmicrosoft.com\"",
        "\"ownerType\": \"OWNER_TYPE_USER\"",
        "\"ownerType\": \"OWNER_TYPE_DIRECTORY\"",
        "\"seats\": 25",
        "ROLE_BILLING_ADMINISTRATOR",
        "\"offerId\": \"office365-e3\"",
        // Jane's licence, and the pools every user sees.
        "\"offerId\": \"office365-e3\",\n      \"enabledUnits\": 10,\n      \"consumedUnits\": 1",
        "\"assignTime\"",
        // The delete-and-restore step: listed in the bin with its purge time, then back.
        "\"purgeTime\"",
        "\"userPrincipalName\": \"jane@contoso.onmicrosoft.com\"",
        // The change feed: the whole story so far, then the stream stays open.
        "\"type\": \"CHANGE_TYPE_DIRECTORY_CREATED\"",
        "\"type\": \"CHANGE_TYPE_USER_ROLES_CHANGED\"",
        "\"type\": \"CHANGE_TYPE_USER_RESTORED\"",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    for expected in [
        "Code: Unauthenticated",
        "Code: PermissionDenied",
        "Code: InvalidArgument",
        "google.rpc.BadRequest",
        // grpcurl's -max-time ended the open stream.
        "Code: DeadlineExceeded",
    ] {
        assert!(
            stdout.contains(expected) || stderr.contains(expected),
            "missing {expected:?} in:\n{stdout}\n{stderr}"
        );
    }
    // The retry with the same request_id returned the same subscription: the azure offer
    // appears in two CreateSubscription answers, once in the list and once in the transfer's
    // answer, never as a second Azure subscription.
    let azure_subscriptions = stdout
        .matches("\"offerId\": \"azure-pay-as-you-go\"")
        .count();
    assert_eq!(
        azure_subscriptions, 4,
        "two identical answers, one listed, one transferred:\n{stdout}"
    );
    // The transfer's answer names Tricia as the owner.
    let tricia_id = stdout
        .split("\"userPrincipalName\": \"tricia@contoso.onmicrosoft.com\"")
        .next()
        .and_then(|before| before.rsplit("\"id\": \"").next())
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_owned();
    assert!(
        !tricia_id.is_empty() && stdout.contains(&format!("\"ownerUserId\": \"{tricia_id}\"")),
        "the transfer to Tricia:\n{stdout}"
    );
}
