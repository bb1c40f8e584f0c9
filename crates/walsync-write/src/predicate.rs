//! Authorization predicates: SQL boolean expressions parsed with sqlparser at start-up, with
//! the token's values turned into bind parameters, and run by PostgreSQL in the write
//! transaction.
//!
//! In a predicate `old.column` and `new.column` are the row before and after the change,
//! `auth.user_id()` (or PowerSync's `request.user_id()`) is the token's subject,
//! `auth.parameter('name')` one claim as text and `auth.parameters()` (or `request.jwt()`) all
//! claims as `jsonb`. Nothing a client sends is ever part of the SQL: its values arrive as
//! parameters `$1` (old row) and `$2` (new row) as JSON.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Value, visit_expressions_mut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

/// A predicate ready to run: its SQL with `$3` (the user id, text) and `$4` (the claims,
/// jsonb) in place of the token functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predicate {
    pub sql: String,
}

fn parse_expr(sql: &str) -> Result<Expr, String> {
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect)
        .try_with_sql(sql)
        .map_err(|e| e.to_string())?;
    let expr = parser.parse_expr().map_err(|e| e.to_string())?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return Err(format!(
            "unexpected {} after the expression (a predicate is one expression)",
            next.token
        ));
    }
    Ok(expr)
}

/// The one string literal argument of a function call, if that is what it has.
fn string_argument(args: &FunctionArguments) -> Option<String> {
    let FunctionArguments::List(list) = args else {
        return None;
    };
    match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))] => match &v.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn no_arguments(args: &FunctionArguments) -> bool {
    match args {
        FunctionArguments::None => true,
        FunctionArguments::List(list) => list.args.is_empty(),
        FunctionArguments::Subquery(_) => false,
    }
}

impl Predicate {
    /// Parses `sql`; the error says what is wrong with it.
    pub fn parse(sql: &str) -> Result<Predicate, String> {
        let mut expr = parse_expr(sql)?;
        let mut problem = None;
        let _ = visit_expressions_mut(&mut expr, |e| {
            let Expr::Function(f) = e else {
                return ControlFlow::<()>::Continue(());
            };
            let name = f.name.to_string().to_lowercase();
            let replacement = match name.as_str() {
                "auth.user_id" | "request.user_id" if no_arguments(&f.args) => "$3".to_owned(),
                "auth.parameters" | "request.jwt" if no_arguments(&f.args) => "$4".to_owned(),
                "auth.parameter" => match string_argument(&f.args) {
                    Some(claim) => format!("($4 ->> '{}')", claim.replace('\'', "''")),
                    None => {
                        problem = Some(
                            "auth.parameter takes one string literal, the claim's name".to_owned(),
                        );
                        return ControlFlow::Break(());
                    }
                },
                other if other.starts_with("auth.") || other.starts_with("request.") => {
                    problem = Some(format!(
                        "unknown function {other}: auth.user_id(), auth.parameter('name') and auth.parameters() are known"
                    ));
                    return ControlFlow::Break(());
                }
                _ => return ControlFlow::Continue(()),
            };
            match parse_expr(&replacement) {
                Ok(r) => {
                    *e = r;
                    ControlFlow::Continue(())
                }
                Err(err) => {
                    problem = Some(err);
                    ControlFlow::Break(())
                }
            }
        });
        if let Some(p) = problem {
            return Err(p);
        }
        Ok(Predicate {
            sql: expr.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_functions_become_parameters() {
        let p = Predicate::parse(
            "EXISTS (SELECT 1 FROM project_members m WHERE m.project_id = new.project_id \
             AND m.user_id = auth.user_id() AND m.role IN ('owner', 'editor'))",
        )
        .expect("parses");
        assert!(p.sql.contains("m.user_id = $3"), "{}", p.sql);
        assert!(!p.sql.contains("auth"), "{}", p.sql);
        let p = Predicate::parse(
            "new.org = auth.parameter('org''s') AND request.user_id() = old.owner",
        )
        .expect("parses");
        assert!(p.sql.contains("($4 ->> 'org''s')"), "{}", p.sql);
        assert!(p.sql.contains("$3 = old.owner"), "{}", p.sql);
        assert_eq!(Predicate::parse("true").expect("parses").sql, "true");
    }

    #[test]
    fn bad_predicates_are_refused_with_the_reason() {
        let e = Predicate::parse("new.a = 1; DROP TABLE x").expect_err("two statements");
        assert!(e.contains("after the expression"), "{e}");
        let e = Predicate::parse("auth.uid() = new.owner").expect_err("unknown");
        assert!(e.contains("unknown function auth.uid"), "{e}");
        let e = Predicate::parse("auth.parameter(new.x) = 'a'").expect_err("not a literal");
        assert!(e.contains("string literal"), "{e}");
        assert!(Predicate::parse("new.a = ").is_err());
        assert!(Predicate::parse("").is_err());
    }
}
