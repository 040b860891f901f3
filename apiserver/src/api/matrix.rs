//! The seed's function × role matrix, as data: [`MATRIX`] says what each role may do with each
//! function, [`ENDPOINTS`] which function and operation each REST route is. The authorisation
//! middleware ([`super::scope`]) and the matrix sweep test read these two tables and nothing else.

use aigw_crds::TenantType;
use serde::Serialize;

use crate::sso::roles::Role;

/// A row of the seed's matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Function {
    /// 租户设置: domains, display name, logo, theme colour.
    TenantSettings,
    /// 成员管理: invite and disable staff.
    Members,
    /// 角色分配: set a member's roles.
    RoleAssignment,
    /// 客户邀请/管理: invite and manage customers.
    Customers,
    /// 查看客户列表: list customers.
    CustomerList,
    /// 模型定价: the tenant's price list.
    Pricing,
    /// 查看用量/账单: usage and bills.
    Usage,
    /// 结算/提现: settlement and withdrawal.
    Settlement,
    /// 渠道管理 (platform only): upstream channels.
    Channels,
    /// API Key 管理: API keys (Token CRs).
    ApiKeys,
    /// 系统监控/日志 (platform only): channel health and recent errors.
    Monitoring,
}

/// How much of a function a role reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Access {
    /// Nothing (403).
    No,
    /// Only the caller's own objects (a user's own keys and usage).
    Own,
    /// The caller's own objects and those of the customers bound to them (sales).
    Bound,
    /// Every object of the tenant, reading only (finance's customer list).
    ReadOnly,
    /// Every object of the tenant (and, on the platform tenant, of every tenant where the
    /// endpoint takes a `tenant` parameter).
    All,
}

/// One row: the function, whether only the platform tenant has it (the seed's `*`), and the
/// access of each role in [`Role::ALL`] order (owner, operator, sales, finance, tech, user).
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub function: Function,
    pub platform_only: bool,
    pub access: [Access; 6],
}

use Access::{All, Bound, No, Own, ReadOnly};

/// The seed's matrix (`seed/…`: 功能模块 × 角色).
pub const MATRIX: [Row; 11] = [
    row(Function::TenantSettings, false, [All, All, No, No, No, No]),
    row(Function::Members, false, [All, All, No, No, No, No]),
    row(Function::RoleAssignment, false, [All, No, No, No, No, No]),
    row(Function::Customers, false, [All, All, Bound, No, No, No]),
    row(
        Function::CustomerList,
        false,
        [All, All, Bound, ReadOnly, No, No],
    ),
    row(Function::Pricing, false, [All, No, No, All, No, No]),
    row(Function::Usage, false, [All, All, Bound, All, No, Own]),
    row(Function::Settlement, false, [All, No, No, All, No, No]),
    row(Function::Channels, true, [All, No, No, No, All, No]),
    row(Function::ApiKeys, false, [All, All, Bound, No, All, Own]),
    row(Function::Monitoring, true, [All, No, No, No, All, No]),
];

const fn row(function: Function, platform_only: bool, access: [Access; 6]) -> Row {
    Row {
        function,
        platform_only,
        access,
    }
}

/// Whether an endpoint reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Op {
    Read,
    Write,
}

/// The access that roles `roles` of a tenant of `kind` have to `function` for `op`: the widest of
/// the roles' (permissions are their union); a read-only access does not write; a platform-only
/// function is nothing on a reseller.
pub fn access(kind: TenantType, roles: &[Role], function: Function, op: Op) -> Access {
    let Some(row) = MATRIX.iter().find(|r| r.function == function) else {
        return No;
    };
    if row.platform_only && kind != TenantType::Platform {
        return No;
    }
    roles
        .iter()
        .filter(|r| r.available_to(kind))
        .filter_map(|r| Role::ALL.iter().position(|x| x == r))
        .filter_map(|i| row.access.get(i).copied())
        .map(|a| {
            if op == Op::Write && a == ReadOnly {
                No
            } else {
                a
            }
        })
        .max()
        .unwrap_or(No)
}

/// A REST route: method, path as the router declares it, and what it is. `function: None` is a
/// route every signed-in member may call (their own profile).
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub method: &'static str,
    pub path: &'static str,
    pub function: Option<Function>,
    pub op: Op,
}

const fn ep(method: &'static str, path: &'static str, function: Function, op: Op) -> Endpoint {
    Endpoint {
        method,
        path,
        function: Some(function),
        op,
    }
}

/// Every authorised route of `/api/v1`. A route missing here is refused (the middleware fails
/// closed), and a test checks that the router, this table and the OpenAPI document agree.
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "GET",
        path: "/api/v1/me",
        function: None,
        op: Op::Read,
    },
    ep("GET", "/api/v1/tenant", Function::TenantSettings, Op::Read),
    ep(
        "PATCH",
        "/api/v1/tenant",
        Function::TenantSettings,
        Op::Write,
    ),
    ep("GET", "/api/v1/members", Function::Members, Op::Read),
    ep(
        "PATCH",
        "/api/v1/members/{id}",
        Function::Members,
        Op::Write,
    ),
    ep(
        "PUT",
        "/api/v1/members/{id}/roles",
        Function::RoleAssignment,
        Op::Write,
    ),
    ep("GET", "/api/v1/customers", Function::CustomerList, Op::Read),
    ep("GET", "/api/v1/resellers", Function::CustomerList, Op::Read),
    ep(
        "PUT",
        "/api/v1/resellers/{name}/sales",
        Function::Customers,
        Op::Write,
    ),
    ep(
        "PATCH",
        "/api/v1/customers/{id}",
        Function::Customers,
        Op::Write,
    ),
    ep("GET", "/api/v1/keys", Function::ApiKeys, Op::Read),
    ep("POST", "/api/v1/keys", Function::ApiKeys, Op::Write),
    ep("GET", "/api/v1/keys/{name}", Function::ApiKeys, Op::Read),
    ep("PATCH", "/api/v1/keys/{name}", Function::ApiKeys, Op::Write),
    ep(
        "DELETE",
        "/api/v1/keys/{name}",
        Function::ApiKeys,
        Op::Write,
    ),
    ep("GET", "/api/v1/pricing", Function::Pricing, Op::Read),
    ep("PUT", "/api/v1/pricing", Function::Pricing, Op::Write),
    ep("GET", "/api/v1/usage", Function::Usage, Op::Read),
    ep("GET", "/api/v1/settlements", Function::Settlement, Op::Read),
    ep(
        "GET",
        "/api/v1/settlements/statement",
        Function::Settlement,
        Op::Read,
    ),
    ep(
        "POST",
        "/api/v1/settlements",
        Function::Settlement,
        Op::Write,
    ),
    ep(
        "POST",
        "/api/v1/withdrawals",
        Function::Settlement,
        Op::Write,
    ),
    ep("GET", "/api/v1/channels", Function::Channels, Op::Read),
    ep("POST", "/api/v1/channels", Function::Channels, Op::Write),
    ep(
        "GET",
        "/api/v1/channels/{name}",
        Function::Channels,
        Op::Read,
    ),
    ep(
        "PATCH",
        "/api/v1/channels/{name}",
        Function::Channels,
        Op::Write,
    ),
    ep(
        "DELETE",
        "/api/v1/channels/{name}",
        Function::Channels,
        Op::Write,
    ),
    ep(
        "GET",
        "/api/v1/monitoring/channels",
        Function::Monitoring,
        Op::Read,
    ),
];

/// The endpoint of `method` and the router's matched `path`.
pub fn endpoint(method: &str, path: &str) -> Option<&'static Endpoint> {
    ENDPOINTS
        .iter()
        .find(|e| e.method == method && e.path == path)
}

/// Whether a holder of `roles` in a tenant of `kind` may invite someone who will hold `granted`:
/// an owner needs role assignment, a customer (`user`) needs customer management, any other role
/// member management. Sales reach customers only.
pub fn may_invite(kind: TenantType, roles: &[Role], granted: Role) -> bool {
    let function = match granted {
        Role::Owner => Function::RoleAssignment,
        Role::User => Function::Customers,
        _ => Function::Members,
    };
    access(kind, roles, function, Op::Write) != No
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_function_has_one_row() {
        for f in [
            Function::TenantSettings,
            Function::Members,
            Function::RoleAssignment,
            Function::Customers,
            Function::CustomerList,
            Function::Pricing,
            Function::Usage,
            Function::Settlement,
            Function::Channels,
            Function::ApiKeys,
            Function::Monitoring,
        ] {
            assert_eq!(
                MATRIX.iter().filter(|r| r.function == f).count(),
                1,
                "{f:?}"
            );
        }
    }

    #[test]
    fn union_of_roles_and_platform_rows() {
        let p = TenantType::Platform;
        let r = TenantType::Reseller;
        assert_eq!(
            access(r, &[Role::Finance], Function::CustomerList, Op::Read),
            ReadOnly
        );
        assert_eq!(
            access(r, &[Role::Finance], Function::Customers, Op::Write),
            No
        );
        assert_eq!(
            access(r, &[Role::User, Role::Sales], Function::ApiKeys, Op::Write),
            Bound
        );
        assert_eq!(access(r, &[Role::Owner], Function::Channels, Op::Read), No);
        assert_eq!(access(p, &[Role::Owner], Function::Channels, Op::Read), All);
        // A role the tenant type cannot hold grants nothing, whatever a token claims.
        assert_eq!(access(r, &[Role::Tech], Function::ApiKeys, Op::Read), No);
        assert!(may_invite(r, &[Role::Sales], Role::User));
        assert!(!may_invite(r, &[Role::Sales], Role::Finance));
        assert!(!may_invite(p, &[Role::Operator], Role::Owner));
        assert!(may_invite(p, &[Role::Operator], Role::Tech));
        assert!(!may_invite(r, &[Role::Finance], Role::User));
    }

    /// The table is the seed's: its markdown matrix (`../shared/seed/…`, next to the project) is
    /// parsed and compared cell by cell, so a wrong cell here fails even though the middleware and
    /// the sweep both read this table.
    #[test]
    fn matrix_is_the_seed_documents() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/seed/000_d143d48d2efa4d4c.txt");
        let Ok(seed) = std::fs::read_to_string(&path) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "the seed document is missing at {}",
                path.display()
            );
            eprintln!("SKIPPED: the seed document is not next to this checkout");
            return;
        };
        let functions = [
            ("租户设置", Function::TenantSettings),
            ("成员管理", Function::Members),
            ("角色分配", Function::RoleAssignment),
            ("客户邀请", Function::Customers),
            ("查看客户列表", Function::CustomerList),
            ("模型定价", Function::Pricing),
            ("查看用量", Function::Usage),
            ("结算", Function::Settlement),
            ("渠道管理", Function::Channels),
            ("API Key", Function::ApiKeys),
            ("系统监控", Function::Monitoring),
        ];
        let mut compared = 0;
        for line in seed.lines().filter(|l| l.starts_with("| ")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let Some((_, f)) = functions.iter().find(|(zh, _)| cells[1].starts_with(zh)) else {
                continue;
            };
            if cells.len() != 9 {
                continue;
            }
            let parsed: Vec<Access> = cells[2..8]
                .iter()
                .map(|c| match *c {
                    "❌" => No,
                    "✅" | "✅*" | "✅ (全部)" => All,
                    "✅ (名下)" | "✅ (名下客户)" => Bound,
                    "✅ (只读)" => ReadOnly,
                    "✅ (仅自己)" => Own,
                    other => panic!("unknown cell {other:?} in {line}"),
                })
                .collect();
            // The seed's plain ✅ for sales on customers and API keys is read with its text: a sales
            // person's customers are the ones bound to them (客户归属, customer_bindings), so
            // they manage those customers and their keys, not everyone's.
            let mut parsed = parsed;
            if matches!(f, Function::Customers | Function::ApiKeys) && parsed[2] == All {
                parsed[2] = Bound;
            }
            let row = MATRIX.iter().find(|r| r.function == *f).unwrap();
            assert_eq!(row.access.to_vec(), parsed, "{f:?}: {line}");
            assert_eq!(row.platform_only, line.contains("✅*"), "{f:?}: {line}");
            compared += 1;
        }
        assert_eq!(
            compared,
            MATRIX.len(),
            "every row of the seed's matrix was compared"
        );
    }

    #[test]
    fn endpoints_are_unique() {
        for (i, a) in ENDPOINTS.iter().enumerate() {
            assert!(
                !ENDPOINTS[i + 1..]
                    .iter()
                    .any(|b| a.method == b.method && a.path == b.path),
                "{} {}",
                a.method,
                a.path
            );
        }
    }
}
