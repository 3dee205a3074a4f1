//! Validated values of the directory domain. Each `parse` enforces one of the contract's
//! field rules; once a value exists it is valid, so the rest of the domain never re-checks.

use contract::fields::Violation;

/// The suffix of every directory's initial domain.
pub const INITIAL_DOMAIN_SUFFIX: &str = ".onmicrosoft.com";
const MAX_UPN_CHARS: usize = 113;
const MAX_LOCAL_CHARS: usize = 64;
const MAX_DOMAIN_CHARS: usize = 48;

/// A domain prefix: 2..=32 of `a-z 0-9`, case-folded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPrefix(String);

impl DomainPrefix {
    pub fn parse(field: &str, raw: &str) -> Result<Self, Violation> {
        let folded = raw.to_ascii_lowercase();
        let len = folded.chars().count();
        if !(2..=32).contains(&len) {
            return Err(Violation::new(field, "must be 2 to 32 characters"));
        }
        if !folded
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(Violation::new(
                field,
                "may contain only letters a-z and digits 0-9",
            ));
        }
        Ok(Self(folded))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<prefix>.onmicrosoft.com`.
    pub fn initial_domain(&self) -> String {
        format!("{}{INITIAL_DOMAIN_SUFFIX}", self.0)
    }
}

fn local_part_violation(local: &str) -> Option<&'static str> {
    let len = local.chars().count();
    if !(1..=MAX_LOCAL_CHARS).contains(&len) {
        return Some("the part before @ must be 1 to 64 characters");
    }
    if !local
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "'.-_!#^~".contains(c))
    {
        return Some("the part before @ may contain only A-Z a-z 0-9 ' . - _ ! # ^ ~");
    }
    if local.starts_with('.') || local.ends_with('.') {
        return Some("the part before @ must not start or end with a period");
    }
    None
}

/// The local part of a UPN (what comes before `@`), as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    pub fn parse(field: &str, raw: &str) -> Result<Self, Violation> {
        match local_part_violation(raw) {
            Some(why) => Err(Violation::new(field, why)),
            None => Ok(Self(raw.to_owned())),
        }
    }

    /// `local@domain` in `domain`.
    pub fn at(&self, domain: &str) -> Upn {
        Upn {
            value: format!("{}@{}", self.0, domain),
            local_len: self.0.len(),
        }
    }
}

/// A user principal name `local@domain`: unique across directories, compared
/// case-insensitively. The domain is kept lower-case; the local part as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upn {
    value: String,
    local_len: usize,
}

impl Upn {
    pub fn parse(field: &str, raw: &str) -> Result<Self, Violation> {
        if raw.is_empty() {
            return Err(Violation::new(field, "is required"));
        }
        if raw.chars().count() > MAX_UPN_CHARS {
            return Err(Violation::new(field, "must be at most 113 characters"));
        }
        let Some((local, domain)) = raw.rsplit_once('@') else {
            return Err(Violation::new(field, "must have the form name@domain"));
        };
        if let Some(why) = local_part_violation(local) {
            return Err(Violation::new(field, why));
        }
        if domain.is_empty() || domain.chars().count() > MAX_DOMAIN_CHARS {
            return Err(Violation::new(
                field,
                "the domain after @ must be 1 to 48 characters",
            ));
        }
        let labels_ok = domain.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
        if !labels_ok {
            return Err(Violation::new(
                field,
                "the domain after @ must be a domain name such as contoso.onmicrosoft.com",
            ));
        }
        Ok(Self {
            value: format!("{local}@{}", domain.to_ascii_lowercase()),
            local_len: local.len(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// The lower-cased form every comparison and unique index uses.
    pub fn key(&self) -> String {
        self.value.to_ascii_lowercase()
    }

    pub fn domain(&self) -> &str {
        &self.value[self.local_len + 1..]
    }
}

/// A password: 8..=256 characters with at least three of lower case, upper case, digit,
/// symbol. Never printed.
#[derive(Clone)]
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

impl Password {
    pub fn parse(field: &str, raw: &str) -> Result<Self, Violation> {
        let len = raw.chars().count();
        if !(8..=256).contains(&len) {
            return Err(Violation::new(field, "must be 8 to 256 characters"));
        }
        if raw.chars().any(char::is_control) {
            return Err(Violation::new(field, "must not contain control characters"));
        }
        let classes = [
            raw.chars().any(|c| c.is_lowercase()),
            raw.chars().any(|c| c.is_uppercase()),
            raw.chars().any(char::is_numeric),
            raw.chars().any(|c| !c.is_alphanumeric()),
        ];
        if classes.iter().filter(|&&has| has).count() < 3 {
            return Err(Violation::new(
                field,
                "must contain at least three of: lower case, upper case, digit, symbol",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// A password as typed at sign-in, checked only against the stored hash.
    pub fn unchecked(raw: &str) -> Self {
        Self(raw.to_owned())
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// An organizational role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    GlobalAdministrator,
    BillingAdministrator,
    UserAdministrator,
    PasswordAdministrator,
    ServiceAdministrator,
    LicenseAdministrator,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::GlobalAdministrator,
        Role::BillingAdministrator,
        Role::UserAdministrator,
        Role::PasswordAdministrator,
        Role::ServiceAdministrator,
        Role::LicenseAdministrator,
    ];

    fn bit(self) -> i64 {
        match self {
            Role::GlobalAdministrator => 1 << 1,
            Role::BillingAdministrator => 1 << 2,
            Role::UserAdministrator => 1 << 3,
            Role::PasswordAdministrator => 1 << 4,
            Role::ServiceAdministrator => 1 << 5,
            Role::LicenseAdministrator => 1 << 6,
        }
    }
}

/// A set of roles, stored as a bit mask (one column, one read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoleSet(i64);

impl RoleSet {
    pub const EMPTY: RoleSet = RoleSet(0);

    pub fn of(roles: impl IntoIterator<Item = Role>) -> Self {
        Self(roles.into_iter().fold(0, |mask, r| mask | r.bit()))
    }

    /// The set a stored mask means; bits no role uses are dropped.
    pub fn from_bits(bits: i64) -> Self {
        Self::of(Role::ALL.into_iter().filter(|r| bits & r.bit() != 0))
    }

    pub fn bits(self) -> i64 {
        self.0
    }

    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn any_of(self, roles: &[Role]) -> bool {
        roles.iter().any(|&r| self.contains(r))
    }

    /// The roles in enum order.
    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |&r| self.contains(r))
    }

    /// The bit mask of one role: the filter value the store matches.
    pub fn mask_of(role: Role) -> i64 {
        role.bit()
    }
}

/// What another service asks permission for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    PurchaseSubscription,
    ManageSubscriptions,
    ReadSubscriptions,
    ManageUsers,
    ManageLicenses,
    ReadLicenses,
}

/// How a user is looked up by GetUser.
#[derive(Debug, Clone)]
pub enum UserLookup {
    Id(uuid::Uuid),
    Upn(Upn),
}

/// A validated CreateDirectory request.
#[derive(Debug)]
pub struct NewDirectory {
    pub display_name: String,
    pub domain_prefix: DomainPrefix,
    pub admin_user_name: UserName,
    pub admin_display_name: String,
    pub admin_password: Password,
}

/// A validated CreateUser request.
#[derive(Debug)]
pub struct NewUser {
    pub upn: Upn,
    pub display_name: String,
    pub password: Password,
    pub roles: RoleSet,
}

/// A validated page request of ListDeletedUsers.
#[derive(Debug)]
pub struct Page {
    pub page_size: u32,
    pub page_token: String,
}

/// A validated ListUsers request.
#[derive(Debug)]
pub struct ListUsersQuery {
    pub page_size: u32,
    pub page_token: String,
    pub role: Option<Role>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upn_rules() {
        let ok = Upn::parse("u", "Kelley.O'Neil@Contoso.onmicrosoft.com").expect("valid");
        assert_eq!(ok.as_str(), "Kelley.O'Neil@contoso.onmicrosoft.com");
        assert_eq!(ok.key(), "kelley.o'neil@contoso.onmicrosoft.com");
        assert_eq!(ok.domain(), "contoso.onmicrosoft.com");
        for bad in [
            "",
            "nodomain",
            "@contoso.onmicrosoft.com",
            ".a@contoso.onmicrosoft.com",
            "a.@contoso.onmicrosoft.com",
            "a b@contoso.onmicrosoft.com",
            "a@",
            "a@bad..domain",
            "a@xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.com",
        ] {
            assert!(Upn::parse("u", bad).is_err(), "{bad:?} should be refused");
        }
        let local = "a".repeat(64);
        assert!(Upn::parse("u", &format!("{local}@c.onmicrosoft.com")).is_ok());
        assert!(Upn::parse("u", &format!("{local}a@c.onmicrosoft.com")).is_err());
    }

    #[test]
    fn prefix_rules() {
        assert_eq!(
            DomainPrefix::parse("d", "Contoso1").map(|p| p.initial_domain()),
            Ok("contoso1.onmicrosoft.com".to_owned())
        );
        assert!(DomainPrefix::parse("d", "c").is_err());
        assert!(DomainPrefix::parse("d", &"c".repeat(33)).is_err());
        assert!(DomainPrefix::parse("d", "con-toso").is_err());
    }

    #[test]
    fn password_rules() {
        assert!(Password::parse("p", "Passw0rd").is_ok());
        assert!(Password::parse("p", "password1!").is_ok());
        assert!(Password::parse("p", "Pa1!").is_err());
        assert!(Password::parse("p", "passwordpassword").is_err());
        assert!(Password::parse("p", "password12").is_err());
        assert!(Password::parse("p", &format!("Aa1{}", "x".repeat(254))).is_err());
        assert_eq!(
            format!("{:?}", Password::unchecked("secret")),
            "Password(..)"
        );
    }

    #[test]
    fn role_sets_round_trip() {
        let set = RoleSet::of([Role::UserAdministrator, Role::GlobalAdministrator]);
        assert_eq!(RoleSet::from_bits(set.bits()), set);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![Role::GlobalAdministrator, Role::UserAdministrator]
        );
        assert!(RoleSet::from_bits(1).is_empty());
    }
}

/// Property tests: the parsers take any input without panicking, and what they accept keeps
/// the contract's rule.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn upns_that_pass_keep_the_rule(raw in any::<String>()) {
            if let Ok(upn) = Upn::parse("u", &raw) {
                let (local, domain) = upn.as_str().rsplit_once('@').unwrap_or_default();
                prop_assert!(upn.as_str().chars().count() <= 113);
                prop_assert!((1..=64).contains(&local.chars().count()));
                prop_assert!(!local.starts_with('.') && !local.ends_with('.'));
                prop_assert!(local.chars().all(|c| c.is_ascii_alphanumeric() || "'.-_!#^~".contains(c)));
                prop_assert!((1..=48).contains(&domain.len()));
                prop_assert_eq!(upn.domain(), domain);
                prop_assert_eq!(upn.key(), upn.as_str().to_ascii_lowercase());
            }
        }

        #[test]
        fn upn_shaped_input_parses(local in "[A-Za-z0-9_~-][A-Za-z0-9'._~-]{0,20}[A-Za-z0-9_]", prefix in "[a-z0-9]{2,32}") {
            let raw = format!("{local}@{prefix}.onmicrosoft.com");
            prop_assert!(Upn::parse("u", &raw).is_ok(), "{}", raw);
        }

        #[test]
        fn passwords_that_pass_keep_the_rule(raw in any::<String>()) {
            if Password::parse("p", &raw).is_ok() {
                prop_assert!((8..=256).contains(&raw.chars().count()));
            }
        }

        #[test]
        fn prefixes_that_pass_keep_the_rule(raw in any::<String>()) {
            if let Ok(prefix) = DomainPrefix::parse("d", &raw) {
                prop_assert!((2..=32).contains(&prefix.as_str().len()));
                prop_assert!(prefix.as_str().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
            }
        }
    }
}
