//! SQL (parsed by sqlparser) to compiled queries, with errors that name the offending part.

use sqlparser::ast::{
    BinaryOperator, CastKind, DataType, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    GroupByExpr, Ident, InTarget, ObjectNamePart, Query, Select, SelectItem, SetExpr, Statement,
    TableFactor, UnaryOperator, Value as SqlValue,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use walsync_types::Value;

use crate::expr::{Cast, Filter, JsonKey, Operand};
use crate::row::RowRef;

/// Which table a query reads; without a schema, `public`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableMatch {
    pub schema: String,
    pub name: String,
}

impl TableMatch {
    pub(crate) fn matches(&self, row: &RowRef<'_>) -> bool {
        row.table == self.name && row.schema == self.schema
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Item {
    All,
    Expr { name: String, operand: Operand },
}

/// A SELECT in the supported subset.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    pub table: Option<(TableMatch, Option<String>)>,
    pub items: Vec<Item>,
    pub filter: Filter,
    /// Request values used: the query reads client-supplied parameters.
    pub untrusted: bool,
}

/// What `bucket.<x>` and `request.*` mean in the query being compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Parameter,
    Data,
}

/// An identifier as PostgreSQL (and PowerSync) read it: unquoted, folded to lower case; quoted,
/// as written.
pub(crate) fn ident(i: &Ident) -> String {
    match i.quote_style {
        Some(_) => i.value.clone(),
        None => i.value.to_lowercase(),
    }
}

pub(crate) fn compile(sql: &str, role: Role) -> Result<Compiled, String> {
    compile_with(sql, role, false)
}

/// [`compile`], where `chains` also accepts `chain.value(N)`: the values parameter query `N`
/// of the same definition finds (what a stream's nested subquery or join compiles into; not
/// for rules files).
pub(crate) fn compile_with(sql: &str, role: Role, chains: bool) -> Result<Compiled, String> {
    let statements =
        Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| format!("cannot parse: {e}"))?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return Err("expected exactly one SELECT".into());
    };
    let select = plain_select(query)?;
    let table = match select.from.as_slice() {
        [] => None,
        [t] if t.joins.is_empty() => match &t.relation {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => {
                let parts: Vec<String> = name
                    .0
                    .iter()
                    .map(|p| match p {
                        ObjectNamePart::Identifier(i) => Ok(ident(i)),
                        other => Err(format!("unsupported table name part `{other}`")),
                    })
                    .collect::<Result<_, _>>()?;
                let table = match parts.as_slice() {
                    [n] => TableMatch {
                        schema: "public".into(),
                        name: n.clone(),
                    },
                    [s, n] => TableMatch {
                        schema: s.clone(),
                        name: n.clone(),
                    },
                    _ => return Err(format!("unsupported table name `{name}`")),
                };
                Some((table, alias.as_ref().map(|a| ident(&a.name))))
            }
            other => {
                return Err(format!(
                    "unsupported FROM item `{other}`: only a table is allowed"
                ));
            }
        },
        _ => return Err("joins and several tables are not supported yet".into()),
    };
    let mut c = Compiler {
        role,
        untrusted: false,
        has_table: table.is_some(),
        chains,
    };
    let mut items = Vec::new();
    for item in &select.projection {
        items.push(match item {
            SelectItem::Wildcard(_) => {
                if table.is_none() {
                    return Err("`*` needs a table".into());
                }
                Item::All
            }
            SelectItem::UnnamedExpr(e) => Item::Expr {
                name: default_name(e)?,
                operand: c.operand(e)?,
            },
            SelectItem::ExprWithAlias { expr, alias } => Item::Expr {
                name: ident(alias),
                operand: c.operand(expr)?,
            },
            other => return Err(format!("unsupported select item `{other}`")),
        });
    }
    let filter = match &select.selection {
        Some(e) => c.filter(e)?,
        None => Filter::True,
    };
    Ok(Compiled {
        table,
        items,
        filter,
        untrusted: c.untrusted,
    })
}

pub(crate) fn plain_select(query: &Query) -> Result<&Select, String> {
    if query.with.is_some() || query.order_by.is_some() || query.limit_clause.is_some() {
        return Err("WITH, ORDER BY, LIMIT and OFFSET are not supported".into());
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err(format!(
            "unsupported query `{}`: expected a plain SELECT",
            query.body
        ));
    };
    if select.distinct.is_some()
        || select.having.is_some()
        || !matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty())
    {
        return Err("DISTINCT, GROUP BY and HAVING are not supported".into());
    }
    Ok(select)
}

fn default_name(e: &Expr) -> Result<String, String> {
    match e {
        Expr::Identifier(i) => Ok(ident(i)),
        Expr::CompoundIdentifier(parts) => Ok(parts.last().map(ident).unwrap_or_default()),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => default_name(expr),
        other => Err(format!("`{other}` needs a name: add `AS <name>`")),
    }
}

struct Compiler {
    role: Role,
    untrusted: bool,
    has_table: bool,
    chains: bool,
}

impl Compiler {
    fn filter(&mut self, e: &Expr) -> Result<Filter, String> {
        Ok(match e {
            Expr::Nested(inner) => self.filter(inner)?,
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                let mut parts = Vec::new();
                for side in [left, right] {
                    match self.filter(side)? {
                        Filter::And(inner) => parts.extend(inner),
                        f => parts.push(f),
                    }
                }
                Filter::And(parts)
            }
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Or,
                right,
            } => Filter::Or(vec![self.filter(left)?, self.filter(right)?]),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => {
                let (l, r) = (self.operand(left)?, self.operand(right)?);
                if !l.is_known() && !r.is_known() {
                    return Err(format!(
                        "`{e}` compares two request or bucket values: one side must come from the row"
                    ));
                }
                Filter::Eq(l, r)
            }
            Expr::BinaryOp {
                left,
                op: BinaryOperator::NotEq,
                right,
            } => Filter::NotEq(self.known(left, e)?, self.known(right, e)?),
            Expr::IsNull(x) => Filter::IsNull {
                operand: self.known(x, e)?,
                negated: false,
            },
            Expr::IsNotNull(x) => Filter::IsNull {
                operand: self.known(x, e)?,
                negated: true,
            },
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated,
                ..
            } => {
                let operand = self.operand(expr)?;
                if !operand.is_known() && *negated {
                    return Err(format!(
                        "`{e}`: NOT IN cannot bind a request or bucket value"
                    ));
                }
                let list = list
                    .iter()
                    .map(|i| self.known(i, e))
                    .collect::<Result<_, _>>()?;
                Filter::InList {
                    operand,
                    list,
                    negated: *negated,
                }
            }
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } => {
                // `x = ANY(array_column)`, PostgreSQL's spelling of membership.
                Filter::InArray(self.operand(left)?, self.known(right, e)?)
            }
            // A boolean column alone: `WHERE active`.
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                Filter::Eq(self.known(e, e)?, Operand::Literal(Value::Bool(true)))
            }
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => self.negated(expr, e)?,
            other => return Err(format!("unsupported condition `{other}`")),
        })
    }

    /// `NOT x` where SQL's three values allow it as a plain filter: `NOT column` (false, not
    /// null), `NOT (a = b)`, `NOT (x IN (…))`, `NOT (x IS [NOT] NULL)`.
    fn negated(&mut self, inner: &Expr, whole: &Expr) -> Result<Filter, String> {
        Ok(match inner {
            Expr::Nested(x) => self.negated(x, whole)?,
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => Filter::Eq(
                self.known(inner, whole)?,
                Operand::Literal(Value::Bool(false)),
            ),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => Filter::NotEq(self.known(left, whole)?, self.known(right, whole)?),
            Expr::IsNull(x) => Filter::IsNull {
                operand: self.known(x, whole)?,
                negated: true,
            },
            Expr::IsNotNull(x) => Filter::IsNull {
                operand: self.known(x, whole)?,
                negated: false,
            },
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated,
                ..
            } => Filter::InList {
                operand: self.known(expr, whole)?,
                list: list
                    .iter()
                    .map(|i| self.known(i, whole))
                    .collect::<Result<_, _>>()?,
                negated: !*negated,
            },
            _ => return Err(format!("unsupported condition `{whole}`")),
        })
    }

    /// An operand that must not involve request or bucket values.
    fn known(&mut self, x: &Expr, whole: &Expr) -> Result<Operand, String> {
        let o = self.operand(x)?;
        if !o.is_known() {
            return Err(format!(
                "`{whole}`: a request or bucket value can only be compared with `=` or `IN`"
            ));
        }
        Ok(o)
    }

    fn operand(&mut self, e: &Expr) -> Result<Operand, String> {
        Ok(match e {
            Expr::Nested(inner) => self.operand(inner)?,
            Expr::Identifier(i) => {
                if !self.has_table {
                    return Err(format!(
                        "`{e}` names a column, but the query reads no table"
                    ));
                }
                Operand::Column(ident(i))
            }
            Expr::CompoundIdentifier(parts) => {
                let names: Vec<String> = parts.iter().map(ident).collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                match (names.as_slice(), self.role) {
                    (["bucket", p], Role::Data) => Operand::Unknown(format!("bucket.{p}")),
                    (["bucket", _], Role::Parameter) => {
                        return Err(format!("`{e}`: bucket parameters are for data queries"));
                    }
                    (["token_parameters", "user_id"], Role::Parameter) => {
                        Operand::Unknown("request.user_id()".into())
                    }
                    (["token_parameters", p], Role::Parameter) => {
                        Operand::Unknown(format!("token:{p}"))
                    }
                    (["token_parameters", _], Role::Data) => {
                        return Err(format!(
                            "`{e}`: data queries may use only bucket parameters"
                        ));
                    }
                    // `table.column` qualified by the query's table or alias.
                    ([_, col], _) if self.has_table => Operand::Column((*col).to_owned()),
                    _ => return Err(format!("unsupported name `{e}`")),
                }
            }
            Expr::Value(v) => Operand::Literal(
                literal(&v.value).ok_or_else(|| format!("unsupported literal `{v}`"))?,
            ),
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } => match self.operand(expr)? {
                Operand::Literal(Value::Int(i)) => Operand::Literal(Value::Int(-i)),
                Operand::Literal(Value::Float(f)) => Operand::Literal(Value::Float(-f)),
                _ => return Err(format!("unsupported expression `{e}`")),
            },
            Expr::Cast {
                kind: CastKind::Cast | CastKind::DoubleColon,
                expr,
                data_type,
                ..
            } => Operand::Cast(
                Box::new(self.operand(expr)?),
                cast(data_type)
                    .ok_or_else(|| format!("unsupported cast `{e}`: use text, integer or real"))?,
            ),
            Expr::BinaryOp {
                left,
                op: op @ (BinaryOperator::Arrow | BinaryOperator::LongArrow),
                right,
            } => {
                let as_text = *op == BinaryOperator::LongArrow;
                let key = match self.operand(right)? {
                    Operand::Literal(Value::Text(s)) => JsonKey::Field(s),
                    Operand::Literal(Value::Int(i)) => JsonKey::Index(i),
                    _ => {
                        return Err(format!(
                            "`{e}`: the JSON key must be a string or integer literal"
                        ));
                    }
                };
                // A request object with a key is one unknown of its own.
                if let Some(request) = self.request_object(left)? {
                    let name = match &key {
                        JsonKey::Field(f) => f.clone(),
                        JsonKey::Index(i) => i.to_string(),
                    };
                    return Ok(Operand::Unknown(format!(
                        "{request}{}:{name}",
                        if as_text { "" } else { "->" }
                    )));
                }
                Operand::Json {
                    base: Box::new(self.operand(left)?),
                    key,
                    as_text,
                }
            }
            Expr::Function(f) if self.chains && chain_function(f).is_some() => {
                Operand::Unknown(format!("chain:{}", chain_function(f).unwrap_or_default()))
            }
            Expr::Function(f) if self.request_value(f)?.is_some() => {
                Operand::Unknown(self.request_value(f)?.unwrap_or_default())
            }
            Expr::Function(f) => match self.request_object(e)? {
                Some("user_id") => Operand::Unknown("request.user_id()".into()),
                Some(obj) => {
                    return Err(format!(
                        "`{f}` is an object: take a field with ->> 'name' ({obj})"
                    ));
                }
                None => return Err(format!("unsupported function `{f}`")),
            },
            other => return Err(format!("unsupported expression `{other}`")),
        })
    }

    /// `request.jwt()` and `auth.parameters()` → "jwt", `request.parameters()` and
    /// `connection.parameters()` → "param", `subscription.parameters()` → "sub" (a stream
    /// subscription's own parameters), `request.user_id()` and `auth.user_id()` → "user_id";
    /// errors for request functions in data queries.
    fn request_object(&mut self, e: &Expr) -> Result<Option<&'static str>, String> {
        let Expr::Function(f) = e else {
            return Ok(None);
        };
        let Some((namespace, name)) = request_function(f) else {
            return Ok(None);
        };
        if !matches!(&f.args, FunctionArguments::List(l) if l.args.is_empty()) {
            return Err(format!("`{f}` takes no arguments"));
        }
        self.data_role_refuses(f)?;
        let object = match (namespace.as_str(), name.as_str()) {
            ("request" | "auth", "user_id") => "user_id",
            ("request", "jwt") | ("auth", "parameters") => "jwt",
            ("request" | "connection", "parameters") => "param",
            ("subscription", "parameters") => "sub",
            _ => return Err(format!("unknown request function `{f}`")),
        };
        if matches!(object, "param" | "sub") {
            self.untrusted = true;
        }
        Ok(Some(object))
    }

    /// `auth.parameter('k')` (a claim of the token), `connection.parameter('k')` (the client's
    /// connection parameters) and `subscription.parameter('k')` (a stream subscription's): the
    /// unknown each names, as `->> 'k'` on the matching object would.
    fn request_value(&mut self, f: &sqlparser::ast::Function) -> Result<Option<String>, String> {
        let Some((namespace, name)) = request_function(f) else {
            return Ok(None);
        };
        let object = match (namespace.as_str(), name.as_str()) {
            ("auth", "parameter") => "jwt",
            ("connection", "parameter") => "param",
            ("subscription", "parameter") => "sub",
            _ => return Ok(None),
        };
        self.data_role_refuses(f)?;
        let key = match &f.args {
            FunctionArguments::List(l) => match l.args.as_slice() {
                [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))] => match &v.value {
                    SqlValue::SingleQuotedString(k) => Some(k.clone()),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        let Some(key) = key else {
            return Err(format!(
                "`{f}` takes one string literal, the parameter's name"
            ));
        };
        if object != "jwt" {
            self.untrusted = true;
        }
        // The parameter's JSON value as the plain value it is (a boolean stays a boolean, a
        // number a number), so it compares with columns as row values do.
        Ok(Some(format!("{object}=:{key}")))
    }

    fn data_role_refuses(&self, f: &sqlparser::ast::Function) -> Result<(), String> {
        if self.role == Role::Data {
            return Err(format!(
                "`{f}`: data queries may use only bucket parameters; put request values in the parameter query"
            ));
        }
        Ok(())
    }
}

/// `chain.value(N)`: N.
fn chain_function(f: &sqlparser::ast::Function) -> Option<u32> {
    let parts: Vec<String> = f.name.0.iter().map(|p| p.to_string()).collect();
    if parts != ["chain", "value"] {
        return None;
    }
    match &f.args {
        FunctionArguments::List(l) => match l.args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))] => match &v.value {
                SqlValue::Number(n, _) => n.parse().ok(),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

/// A function of the request's namespaces (`request`, `auth`, `connection`, `subscription`),
/// as `(namespace, name)` in lower case.
pub(crate) fn request_function(f: &sqlparser::ast::Function) -> Option<(String, String)> {
    let parts: Vec<String> = f
        .name
        .0
        .iter()
        .map(|p| p.to_string().to_lowercase())
        .collect();
    match parts.as_slice() {
        [ns, name]
            if matches!(
                ns.as_str(),
                "request" | "auth" | "connection" | "subscription"
            ) =>
        {
            Some((ns.clone(), name.clone()))
        }
        _ => None,
    }
}

fn literal(v: &SqlValue) -> Option<Value> {
    Some(match v {
        SqlValue::Number(n, _) => match n.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Float(n.parse().ok()?),
        },
        SqlValue::SingleQuotedString(s) => Value::Text(s.clone()),
        SqlValue::Boolean(b) => Value::Bool(*b),
        SqlValue::Null => Value::Null,
        _ => return None,
    })
}

fn cast(t: &DataType) -> Option<Cast> {
    let name = t.to_string().to_ascii_lowercase();
    Some(match name.as_str() {
        "text" | "varchar" | "character varying" | "uuid" => Cast::Text,
        "int" | "integer" | "bigint" | "int8" | "int4" | "smallint" => Cast::Integer,
        "real" | "float" | "double precision" | "float8" | "numeric" => Cast::Real,
        _ => return None,
    })
}
