//! The seed's roles and which tenant type may grant which (`AvailableRoles`).

use std::{fmt, str::FromStr};

use aigw_crds::TenantType;
use serde::{Deserialize, Serialize};

/// A role a user holds in one tenant. A user may hold several; permissions are their union.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything in the tenant, including role assignment.
    Owner,
    /// Tenant settings, members, customers (platform only).
    Operator,
    /// Customers bound to them, and those customers' usage and keys.
    Sales,
    /// Pricing, bills, settlement.
    Finance,
    /// Channels and monitoring (platform only).
    Tech,
    /// An end user: calls the API, sees their own usage.
    User,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Owner,
        Role::Operator,
        Role::Sales,
        Role::Finance,
        Role::Tech,
        Role::User,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Operator => "operator",
            Role::Sales => "sales",
            Role::Finance => "finance",
            Role::Tech => "tech",
            Role::User => "user",
        }
    }

    /// Whether a tenant of `kind` may grant this role (the seed's `AvailableRoles`: a reseller
    /// has no operator and no tech).
    pub fn available_to(self, kind: TenantType) -> bool {
        match kind {
            TenantType::Platform => true,
            TenantType::Reseller => !matches!(self, Role::Operator | Role::Tech),
        }
    }

    /// Whether a holder of `self` may invite someone who will hold `granted`, as the role
    /// matrix says ([`crate::api::matrix::may_invite`]): owners invite anyone; operators anyone
    /// but an owner (role assignment is the owner's); sales invite customers (`user`), who are
    /// then bound to them. Whether the tenant may grant `granted` at all is
    /// [`check_available`]'s question.
    pub fn may_invite(self, granted: Role) -> bool {
        crate::api::matrix::may_invite(TenantType::Platform, &[self], granted)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?} (one of owner, operator, sales, finance, tech, user)")
            })
    }
}

/// Checks that a tenant of `kind` may grant every role of `roles`; the error names the first
/// that it may not.
pub fn check_available(kind: TenantType, roles: &[Role]) -> Result<(), String> {
    match roles.iter().find(|r| !r.available_to(kind)) {
        Some(r) => Err(format!(
            "role {r} is not available to a {} tenant (a reseller grants owner, sales, finance and user)",
            match kind {
                TenantType::Platform => "platform",
                TenantType::Reseller => "reseller",
            }
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resellers_grant_four_roles() {
        let reseller: Vec<Role> = Role::ALL
            .into_iter()
            .filter(|r| r.available_to(TenantType::Reseller))
            .collect();
        assert_eq!(
            reseller,
            [Role::Owner, Role::Sales, Role::Finance, Role::User]
        );
        assert!(
            Role::ALL
                .iter()
                .all(|r| r.available_to(TenantType::Platform))
        );
        assert!(
            check_available(TenantType::Reseller, &[Role::User, Role::Tech])
                .unwrap_err()
                .contains("role tech")
        );
    }

    #[test]
    fn invitation_rights_follow_the_matrix() {
        assert!(Role::Owner.may_invite(Role::Owner));
        assert!(
            !Role::Operator.may_invite(Role::Owner) && Role::Operator.may_invite(Role::Finance)
        );
        assert!(Role::Sales.may_invite(Role::User) && !Role::Sales.may_invite(Role::Sales));
        assert!(!Role::Finance.may_invite(Role::User) && !Role::User.may_invite(Role::User));
        assert_eq!("finance".parse::<Role>(), Ok(Role::Finance));
        assert!("admin".parse::<Role>().is_err());
    }
}
