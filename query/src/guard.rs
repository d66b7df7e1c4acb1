//! Bounds on what one SQL statement or search filter may cost, checked before and during
//! planning and execution.
//!
//! Three layers, each reached by a different kind of hostile input:
//! - **Shape** ([`check_shape`]): the parsed statement's size. The parser's depth limit only
//!   bounds nesting; chains (`1+1+…`, `UNION ALL` after `UNION ALL`, a 1,500-way join) are
//!   built in loops and then walked recursively by the planner. They are counted here, on the
//!   AST, before anything is planned.
//! - **Function arguments** ([`Guarded`]): a 38-byte `repeat('x', 1500000000)` asks for
//!   1.5 GB in one call, outside DataFusion's memory pool. Every scalar function of a plan is
//!   wrapped; functions whose output (or work) can grow far beyond their input estimate it
//!   from their arguments and refuse before calling.
//! - **Function outputs**: after each call, the output's size is checked, which stops
//!   doubling chains (`s || s` through 30 CTEs) at one step past the limit. String `||` is an
//!   operator, not a function, so it is wrapped in an identity function that checks too.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::ops::ControlFlow;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::{DataType, FieldRef};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, LogicalPlan, Operator, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::sql::sqlparser::ast::{
    Expr as AstExpr, Query, Select, SetExpr, TableFactor, Visit, Visitor,
};

use crate::cancel::Cancel;
use crate::error::{Error, bad};

/// Most expression nodes in one statement (a flat `IN (…)` list of 20,000 literals fits).
pub(crate) const EXPR_NODES_MAX: usize = 20_000;
/// Deepest expression: the length of an operator chain such as `1+1+…+1`.
pub(crate) const EXPR_DEPTH_MAX: usize = 256;
/// Most `SELECT`s in one statement: set operations (`UNION`, `INTERSECT`, `EXCEPT`) and
/// subqueries each add one.
pub(crate) const SELECTS_MAX: usize = 64;
/// Most tables in one statement: each join and each comma in a `FROM` list adds one.
pub(crate) const TABLES_MAX: usize = 64;
/// Largest output of one scalar-function call (one batch of one column).
pub(crate) const VALUE_BYTES_MAX: u64 = 64 << 20;
/// Most work of one call of a quadratic function (`levenshtein`: characters × characters).
pub(crate) const CELLS_MAX: u64 = 200_000_000;

/// Counts the parsed statement: expression nodes and depth, selects, tables.
#[derive(Default)]
struct Shape {
    exprs: usize,
    depth: usize,
    selects: usize,
    tables: usize,
}

impl Visitor for Shape {
    type Break = Error;

    fn pre_visit_expr(&mut self, _expr: &AstExpr) -> ControlFlow<Error> {
        self.exprs += 1;
        self.depth += 1;
        if self.exprs > EXPR_NODES_MAX {
            return too_complex(format!("more than {EXPR_NODES_MAX} expression nodes"));
        }
        if self.depth > EXPR_DEPTH_MAX {
            return too_complex(format!(
                "an expression nested or chained more than {EXPR_DEPTH_MAX} deep (e.g. a \
                 chain of {EXPR_DEPTH_MAX} `+` or `AND`)"
            ));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _expr: &AstExpr) -> ControlFlow<Error> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, _select: &Select) -> ControlFlow<Error> {
        self.selects += 1;
        if self.selects > SELECTS_MAX {
            return too_complex(format!(
                "more than {SELECTS_MAX} SELECTs (set operations and subqueries)"
            ));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Error> {
        // Every operand of a set operation counts: `SELECT`s in `pre_visit_select`, the
        // others (`VALUES`, `TABLE t`) here — a chain of `VALUES` would otherwise count
        // nothing.
        if let Some(with) = &query.with {
            let expanded = expanded_ctes(with, &query.body);
            if expanded > CTE_EXPANSION_MAX {
                return too_complex(format!(
                    "common table expressions that expand to {expanded} table reads (each \
                     reference is planned anew), more than {CTE_EXPANSION_MAX}"
                ));
            }
        }
        let operands = other_set_operands(&query.body);
        if operands > 0 {
            self.selects += operands;
            if self.selects > SELECTS_MAX {
                return too_complex(format!(
                    "more than {SELECTS_MAX} SELECTs (set operations and subqueries)"
                ));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, _factor: &TableFactor) -> ControlFlow<Error> {
        self.tables += 1;
        if self.tables > TABLES_MAX {
            return too_complex(format!("more than {TABLES_MAX} tables (joins)"));
        }
        ControlFlow::Continue(())
    }
}

/// Most table reads a statement's CTEs expand to: a CTE referenced twice by the next, over 30
/// levels, is a 61-line statement and a 2^30-node plan.
pub(crate) const CTE_EXPANSION_MAX: u64 = 4096;

/// Names of the relations a node reads (lowercased).
#[derive(Default)]
struct Relations(Vec<String>);

impl Visitor for Relations {
    type Break = ();
    fn pre_visit_relation(
        &mut self,
        relation: &datafusion::sql::sqlparser::ast::ObjectName,
    ) -> ControlFlow<()> {
        if let Some(ident) = relation.0.last().and_then(|p| p.as_ident()) {
            self.0.push(ident_key(ident));
        }
        ControlFlow::Continue(())
    }
}

/// An identifier as the planner resolves it: unquoted ones are case-insensitive.
fn ident_key(ident: &datafusion::sql::sqlparser::ast::Ident) -> String {
    match ident.quote_style {
        None => ident.value.to_lowercase(),
        Some(_) => ident.value.clone(),
    }
}

fn relations<T: Visit>(node: &T) -> Vec<String> {
    let mut r = Relations::default();
    let _ = node.visit(&mut r);
    r.0
}

/// Table reads the body of a query with `with` plans to, each CTE reference expanded (a
/// reference costs what the CTE's own references cost, plus one).
fn expanded_ctes(with: &datafusion::sql::sqlparser::ast::With, body: &SetExpr) -> u64 {
    let mut cost: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let expand = |names: Vec<String>, cost: &std::collections::HashMap<String, u64>, own: &str| {
        names
            .iter()
            .filter(|n| n.as_str() != own)
            .map(|n| cost.get(n).copied().unwrap_or(1))
            .fold(1u64, u64::saturating_add)
    };
    for cte in &with.cte_tables {
        let name = ident_key(&cte.alias.name);
        let c = expand(relations(&cte.query), &cost, &name);
        cost.insert(name, c);
    }
    expand(relations(body), &cost, "")
}

/// Operands other than `SELECT`s and subqueries of the set operations at the top of a query
/// body, counted without recursion (the parser builds long chains of them).
fn other_set_operands(body: &SetExpr) -> usize {
    let SetExpr::SetOperation { .. } = body else {
        return 0;
    };
    let mut n = 0;
    let mut stack = vec![body];
    while let Some(e) = stack.pop() {
        match e {
            SetExpr::SetOperation { left, right, .. } => {
                stack.push(left);
                stack.push(right);
            }
            SetExpr::Select(_) | SetExpr::Query(_) => {}
            _ => n += 1,
        }
    }
    n
}

fn too_complex(what: String) -> ControlFlow<Error> {
    ControlFlow::Break(bad(
        "sql_too_complex",
        format!("the statement has {what}; split it into smaller queries"),
    ))
}

/// Refuses a parsed statement (or filter expression) beyond the shape limits.
pub(crate) fn check_shape<T: Visit>(node: &T) -> Result<(), Error> {
    match node.visit(&mut Shape::default()) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(e) => Err(e),
    }
}

/// Wraps every scalar function of `plan` (subqueries included) in [`Guarded`], and every
/// string `||` in a size check.
pub(crate) fn plan(plan: LogicalPlan, cancel: &Cancel) -> datafusion::error::Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| {
        let node = node.map_expressions(|e| e.transform_up(|e| wrap(e, cancel)))?;
        node.transform_data(|node| match node {
            // What a projection computes is checked once more as a whole: a scalar result
            // is copied to every row of the batch.
            LogicalPlan::Projection(mut p) => {
                p.expr = p.expr.into_iter().map(|e| check_top(e, cancel)).collect();
                Ok(Transformed::yes(LogicalPlan::Projection(p)))
            }
            other => Ok(Transformed::no(other)),
        })
    })
    .map(|t| t.data)
}

/// A projection's output expression wrapped in [`Checked`] (under its alias), unless it is a
/// plain column or already checked.
fn check_top(e: Expr, cancel: &Cancel) -> Expr {
    match e {
        Expr::Column(_) => e,
        Expr::Alias(mut alias) => {
            alias.expr = Box::new(check_top(*alias.expr, cancel));
            Expr::Alias(alias)
        }
        Expr::ScalarFunction(ref f) if (f.func.inner().as_ref() as &dyn Any).is::<Checked>() => e,
        other => checked_per_batch(other, cancel),
    }
}

/// Wraps every scalar function of `expr` (see [`plan`]).
pub(crate) fn expr(expr: Expr, cancel: &Cancel) -> datafusion::error::Result<Expr> {
    expr.transform_up(|e| wrap(e, cancel)).map(|t| t.data)
}

/// Wraps the filter of every join of an optimized plan in a cancellation check: a
/// nested-loop join evaluates it over and over inside one poll.
pub(crate) fn join_filters(
    plan: LogicalPlan,
    cancel: &Cancel,
) -> datafusion::error::Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| match node {
        LogicalPlan::Join(mut join) if join.filter.is_some() => {
            join.filter = join.filter.take().map(|f| checked(f, cancel));
            Ok(Transformed::yes(LogicalPlan::Join(join)))
        }
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

/// `e` under a size check that may be folded into a constant (`||` of literals).
fn checked(e: Expr, cancel: &Cancel) -> Expr {
    let checked = Arc::new(ScalarUDF::new_from_impl(Checked::new(
        cancel.clone(),
        Volatility::Immutable,
    )));
    Expr::ScalarFunction(ScalarFunction::new_udf(checked, vec![e]))
}

/// `e` under a size check that runs on every batch, with its row count: never folded.
fn checked_per_batch(e: Expr, cancel: &Cancel) -> Expr {
    let checked = Arc::new(ScalarUDF::new_from_impl(Checked::new(
        cancel.clone(),
        Volatility::Volatile,
    )));
    Expr::ScalarFunction(ScalarFunction::new_udf(checked, vec![e]))
}

/// Aggregates whose value is a collection of their inputs: over a window, each row's value
/// holds all the rows before it, so the output grows with the square of the rows, outside
/// the memory pool.
const COLLECTING_AGGREGATES: &[&str] = &["array_agg", "string_agg", "array_union_agg"];

fn wrap(e: Expr, cancel: &Cancel) -> datafusion::error::Result<Transformed<Expr>> {
    use datafusion::logical_expr::expr::WindowFunctionDefinition;
    match e {
        Expr::WindowFunction(ref w)
            if matches!(&w.fun, WindowFunctionDefinition::AggregateUDF(f)
                if COLLECTING_AGGREGATES.contains(&f.name())) =>
        {
            Err(DataFusionError::ResourcesExhausted(format!(
                "{} over a window builds, for every row, the collection of all rows before it; \
                 aggregate with GROUP BY instead",
                w.fun
            )))
        }
        Expr::ScalarFunction(f) if !is_exempt(&f.func) => {
            let guarded = Guarded::new(f.func.clone(), cancel.clone());
            Ok(Transformed::yes(Expr::ScalarFunction(
                ScalarFunction::new_udf(Arc::new(ScalarUDF::new_from_impl(guarded)), f.args),
            )))
        }
        Expr::BinaryExpr(b) if b.op == Operator::StringConcat => {
            Ok(Transformed::yes(checked(Expr::BinaryExpr(b), cancel)))
        }
        other => Ok(Transformed::no(other)),
    }
}

/// Already guarded, or a pure accessor whose output is a part of its input (wrapping
/// `get_field` would hide struct access from the optimizer).
fn is_exempt(func: &ScalarUDF) -> bool {
    let inner: &dyn Any = func.inner().as_ref();
    inner.is::<Guarded>() || inner.is::<Checked>() || func.name() == "get_field"
}

/// A scalar function with its cost checked before and its output size after each call.
#[derive(Debug)]
pub(crate) struct Guarded {
    inner: Arc<ScalarUDF>,
    cancel: Cancel,
}

impl Guarded {
    fn new(inner: Arc<ScalarUDF>, cancel: Cancel) -> Self {
        Self { inner, cancel }
    }
}

impl PartialEq for Guarded {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner
    }
}
impl Eq for Guarded {}
impl Hash for Guarded {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.inner.hash(state)
    }
}

impl ScalarUDFImpl for Guarded {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }
    fn schema_name(&self, args: &[Expr]) -> datafusion::error::Result<String> {
        self.inner.inner().schema_name(args)
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> datafusion::error::Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }
    fn return_field_from_args(
        &self,
        args: ReturnFieldArgs<'_>,
    ) -> datafusion::error::Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> datafusion::error::Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }
    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.inner().conditional_arguments(args)
    }
    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
    fn simplify(
        &self,
        args: Vec<Expr>,
        info: &SimplifyContext,
    ) -> datafusion::error::Result<ExprSimplifyResult> {
        // Simplification may join literal arguments (`concat` of literals): refuse first what
        // would be too large to build.
        let literals: u64 = args
            .iter()
            .map(|a| match a {
                Expr::Literal(v, _) => v.size() as u64,
                _ => 0,
            })
            .sum();
        if literals > VALUE_BYTES_MAX {
            return Err(exhausted(
                self.inner.name(),
                format!("its arguments take {literals} bytes, at most {VALUE_BYTES_MAX} allowed"),
            ));
        }
        // Some functions (`now`, `arrow_cast`) are only ever evaluated by simplification;
        // whatever they simplify to is guarded too.
        match self.inner.simplify(args, info)? {
            ExprSimplifyResult::Simplified(e) => {
                Ok(ExprSimplifyResult::Simplified(expr(e, &self.cancel)?))
            }
            original => Ok(original),
        }
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        self.cancel.check()?;
        check_cost(self.inner.name(), &args.args, args.number_rows)?;
        let out = self.inner.invoke_with_args(args)?;
        check_output(self.inner.name(), &out)?;
        if let ColumnarValue::Scalar(v) = &out {
            self.cancel.charge_scalar(v.size() as u64)?;
        }
        Ok(out)
    }
}

/// Identity with an output size check, around operators that build values (`||`).
#[derive(Debug)]
pub(crate) struct Checked {
    signature: Signature,
    cancel: Cancel,
}

impl PartialEq for Checked {
    fn eq(&self, other: &Self) -> bool {
        self.signature == other.signature
    }
}
impl Eq for Checked {}
impl Hash for Checked {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.signature.hash(state)
    }
}

impl Checked {
    /// Volatile for a projection's check (never folded into a constant at planning, so it
    /// runs on every batch with its row count); immutable elsewhere.
    fn new(cancel: Cancel, volatility: Volatility) -> Self {
        Self {
            signature: Signature::any(1, volatility),
            cancel,
        }
    }
}

impl ScalarUDFImpl for Checked {
    fn name(&self) -> &str {
        "meshnode_checked"
    }
    fn schema_name(&self, args: &[Expr]) -> datafusion::error::Result<String> {
        // Invisible in column names: `a || b` stays `a || b`.
        Ok(args[0].schema_name().to_string())
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(arg_types[0].clone())
    }
    fn return_field_from_args(
        &self,
        args: ReturnFieldArgs<'_>,
    ) -> datafusion::error::Result<FieldRef> {
        Ok(args.arg_fields[0].clone())
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        self.cancel.check()?;
        let number_rows = args.number_rows;
        let value = args.args.into_iter().next().ok_or_else(|| {
            DataFusionError::Internal("meshnode_checked takes one argument".into())
        })?;
        check_output("||", &value)?;
        // A scalar becomes a column of `number_rows` copies after this (a projection).
        if let ColumnarValue::Scalar(v) = &value {
            let expanded = (v.size() as u64).saturating_mul(number_rows as u64);
            if expanded > VALUE_BYTES_MAX {
                return Err(exhausted(
                    "projection",
                    format!(
                        "a value repeated on {number_rows} rows would take {expanded} bytes, at \
                         most {VALUE_BYTES_MAX} allowed"
                    ),
                ));
            }
        }
        Ok(value)
    }
}

fn exhausted(name: &str, what: String) -> DataFusionError {
    DataFusionError::ResourcesExhausted(format!("{name}: {what}"))
}

/// Refuses a call whose output (or work) would exceed the limits, estimated from its
/// arguments. Only functions whose output can be far larger than their input are estimated;
/// the rest are bounded by [`check_output`].
fn check_cost(name: &str, args: &[ColumnarValue], rows: usize) -> datafusion::error::Result<()> {
    let rows = if args.iter().any(|a| matches!(a, ColumnarValue::Array(_))) {
        rows.max(1) as u64
    } else {
        1
    };
    let arg = |i: usize| args.get(i);
    let bytes = match name {
        "repeat" => max_len(arg(0)).saturating_mul(max_int(arg(1))),
        "lpad" | "rpad" => 4u64.saturating_mul(max_int(arg(1))),
        "array_repeat" | "array_resize" => {
            let element = value_bytes(arg(0), rows) / rows;
            (element + 16).saturating_mul(max_int(arg(1)))
        }
        "range" | "generate_series" => 8u64.saturating_mul(series_len(args, name)?),
        "replace" => max_len(arg(0)).saturating_mul(max_len(arg(2)).max(1)),
        "regexp_replace" => (max_len(arg(0)) + 1).saturating_mul(max_len(arg(2)).max(1)),
        "levenshtein" => {
            let cells = max_len(arg(0))
                .saturating_mul(max_len(arg(1)))
                .saturating_mul(rows);
            if cells > CELLS_MAX {
                return Err(exhausted(
                    name,
                    format!(
                        "comparing strings this long costs {cells} steps, at most {CELLS_MAX} allowed"
                    ),
                ));
            }
            0
        }
        // Functions that join their arguments: at most their sum, with a scalar counted
        // once per row when it is combined with arrays (`concat` of three thousand 60 MB
        // strings asks for 180 GB in one allocation).
        "concat" | "concat_ws" | "array_concat" | "array_cat" | "list_concat" | "list_cat"
        | "make_array" | "make_list" | "array_append" | "array_prepend" | "list_append"
        | "list_prepend" | "array_union" | "array_to_string" | "named_struct" | "struct"
        | "map" => {
            let combined: u64 = args.iter().map(|a| value_bytes(Some(a), rows)).sum();
            combined / rows
        }
        _ => 0,
    };
    let total = bytes.saturating_mul(rows);
    if total > VALUE_BYTES_MAX {
        return Err(exhausted(
            name,
            format!(
                "the result would take about {total} bytes, at most {VALUE_BYTES_MAX} allowed per call"
            ),
        ));
    }
    Ok(())
}

/// Bytes of an argument's values (of its slice, not its buffers' capacity); a scalar counts
/// `rows` times.
fn value_bytes(value: Option<&ColumnarValue>, rows: u64) -> u64 {
    match value {
        Some(ColumnarValue::Array(a)) => {
            a.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| a.get_array_memory_size()) as u64
        }
        Some(ColumnarValue::Scalar(s)) => (s.size() as u64).saturating_mul(rows),
        None => 0,
    }
}

/// Refuses an output larger than [`VALUE_BYTES_MAX`].
fn check_output(name: &str, value: &ColumnarValue) -> datafusion::error::Result<()> {
    let size = match value {
        ColumnarValue::Array(a) => a.get_array_memory_size() as u64,
        ColumnarValue::Scalar(s) => s.size() as u64,
    };
    if size > VALUE_BYTES_MAX {
        return Err(exhausted(
            name,
            format!("the result takes {size} bytes, at most {VALUE_BYTES_MAX} allowed per call"),
        ));
    }
    Ok(())
}

/// Elements of a `range`/`generate_series` call: integers only (a date series with a
/// one-second step over ten thousand years has no useful answer).
fn series_len(args: &[ColumnarValue], name: &str) -> datafusion::error::Result<u64> {
    let all_int = args
        .iter()
        .all(|a| a.data_type().is_integer() || a.data_type().is_null());
    if !all_int {
        return Err(DataFusionError::Plan(format!(
            "{name}: only integer arguments are allowed here"
        )));
    }
    let (start, stop, step) = match args.len() {
        1 => (0, max_abs(args.first()), 1),
        2 => (max_abs(args.first()), max_abs(args.get(1)), 1),
        _ => (
            max_abs(args.first()),
            max_abs(args.get(1)),
            min_abs(args.get(2)).max(1),
        ),
    };
    Ok(start.saturating_add(stop) / step + 1)
}

/// Longest string or binary value of an argument, in bytes (0 for other types).
fn max_len(value: Option<&ColumnarValue>) -> u64 {
    match value {
        Some(ColumnarValue::Scalar(s)) => scalar_len(s),
        Some(ColumnarValue::Array(a)) => array_max_len(a),
        None => 0,
    }
}

fn scalar_len(s: &ScalarValue) -> u64 {
    match s {
        ScalarValue::Utf8(Some(v))
        | ScalarValue::LargeUtf8(Some(v))
        | ScalarValue::Utf8View(Some(v)) => v.len() as u64,
        ScalarValue::Binary(Some(v))
        | ScalarValue::LargeBinary(Some(v))
        | ScalarValue::BinaryView(Some(v)) => v.len() as u64,
        _ => 0,
    }
}

fn array_max_len(a: &ArrayRef) -> u64 {
    let longest = |lens: &mut dyn Iterator<Item = usize>| lens.max().unwrap_or(0) as u64;
    match a.data_type() {
        DataType::Utf8 => longest(&mut a.as_string::<i32>().iter().map(|v| v.map_or(0, str::len))),
        DataType::LargeUtf8 => {
            longest(&mut a.as_string::<i64>().iter().map(|v| v.map_or(0, str::len)))
        }
        DataType::Utf8View => {
            longest(&mut a.as_string_view().iter().map(|v| v.map_or(0, str::len)))
        }
        DataType::Binary => longest(
            &mut a
                .as_binary::<i32>()
                .iter()
                .map(|v| v.map_or(0, <[u8]>::len)),
        ),
        DataType::LargeBinary => longest(
            &mut a
                .as_binary::<i64>()
                .iter()
                .map(|v| v.map_or(0, <[u8]>::len)),
        ),
        DataType::BinaryView => {
            longest(&mut a.as_binary_view().iter().map(|v| v.map_or(0, <[u8]>::len)))
        }
        _ => 0,
    }
}

/// The integer values of an argument as i64 (other types: none).
fn ints(value: Option<&ColumnarValue>) -> Vec<i64> {
    let array = match value {
        Some(ColumnarValue::Scalar(s)) => match s.to_array() {
            Ok(a) => a,
            Err(_) => return Vec::new(),
        },
        Some(ColumnarValue::Array(a)) => a.clone(),
        None => return Vec::new(),
    };
    if !array.data_type().is_integer() {
        return Vec::new();
    }
    match arrow::compute::cast(&array, &DataType::Int64) {
        Ok(a) => a
            .as_primitive::<arrow_array::types::Int64Type>()
            .iter()
            .flatten()
            .collect(),
        // Values beyond i64 (u64): as large as it gets.
        Err(_) => vec![i64::MAX],
    }
}

fn max_int(value: Option<&ColumnarValue>) -> u64 {
    ints(value)
        .into_iter()
        .map(|v| v.max(0) as u64)
        .max()
        .unwrap_or(0)
}

fn max_abs(value: Option<&ColumnarValue>) -> u64 {
    ints(value)
        .into_iter()
        .map(i64::unsigned_abs)
        .max()
        .unwrap_or(0)
}

fn min_abs(value: Option<&ColumnarValue>) -> u64 {
    ints(value)
        .into_iter()
        .map(i64::unsigned_abs)
        .min()
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn shape(sql: &str) -> Result<(), Error> {
        let statements = Parser::new(&GenericDialect {})
            .with_recursion_limit(64)
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_statements())
            .expect("parses");
        check_shape(&statements)
    }

    fn code(r: Result<(), Error>) -> String {
        match r {
            Err(e) => e.code().to_string(),
            Ok(()) => "ok".into(),
        }
    }

    #[test]
    fn chains_are_counted_before_planning() {
        let chain = |n: usize, sep: &str| vec!["1"; n].join(sep);
        assert!(shape(&format!("SELECT {}", chain(200, "+"))).is_ok());
        assert_eq!(
            code(shape(&format!("SELECT {}", chain(2000, "+")))),
            "sql_too_complex"
        );
        let unions = vec!["SELECT 1"; 2500].join(" UNION ALL ");
        assert_eq!(code(shape(&unions)), "sql_too_complex");
        let quoted = (1..=30)
            .map(|i| format!("\"t{i}\" AS (SELECT * FROM \"t{0}\" a, \"t{0}\" b)", i - 1))
            .collect::<Vec<_>>()
            .join(", ");
        let quoted = format!("WITH \"t0\" AS (SELECT 1 x), {quoted} SELECT count(*) FROM \"t30\"");
        assert_eq!(code(shape(&quoted)), "sql_too_complex");
        let values = vec!["VALUES (1)"; 2500].join(" UNION ");
        assert_eq!(code(shape(&values)), "sql_too_complex");
        assert!(shape(&vec!["VALUES (1)"; 30].join(" UNION ")).is_ok());
        let joins = (0..1500).map(|i| format!("t{i}")).collect::<Vec<_>>();
        assert_eq!(
            code(shape(&format!("SELECT 1 FROM {}", joins.join(",")))),
            "sql_too_complex"
        );
        let joined = joins.join(" CROSS JOIN ");
        assert_eq!(
            code(shape(&format!("SELECT 1 FROM {joined}"))),
            "sql_too_complex"
        );
        let list = (0..15_000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(shape(&format!("SELECT 1 WHERE 1 IN ({list})")).is_ok());
    }
}

#[cfg(test)]
mod fuzz {
    use rand::{RngExt, SeedableRng};

    /// Statements that reach every part of the gate: set operations, joins, subqueries,
    /// CTEs, EXPLAIN, functions, casts, literals of every kind.
    const CORPUS: &[&str] = &[
        "SELECT name, price FROM skills WHERE price > 10 ORDER BY price DESC LIMIT 5",
        "WITH t AS (SELECT author, count(*) AS n FROM events GROUP BY author) SELECT * FROM t",
        "SELECT a.id FROM events a JOIN events b ON a.id = b.id UNION ALL SELECT 'x'",
        "EXPLAIN SELECT * FROM knn('skills', '[0.1, 0.2]', 3) WHERE domain = 'viticulture'",
        "SELECT CASE WHEN x IN (1, 2, 3) THEN 'a' ELSE lower('B') END FROM (VALUES (1), (2)) v(x)",
        "SELECT * FROM skills WHERE name LIKE '%a%' AND NOT EXISTS (SELECT 1 FROM balances)",
        "SELECT CAST(price AS DOUBLE) / 2.5e3, -1, x'ff', DATE '2026-01-01' FROM skills",
    ];

    fn mutate(text: &str, rng: &mut rand::rngs::StdRng) -> String {
        let pieces = [
            "(",
            ")",
            "'",
            "\"",
            ",",
            " UNION ",
            " JOIN ",
            "--",
            "/*",
            "*/",
            ";",
            "\\",
            "\u{0}",
            "é",
            "9999999999999999999999",
            " EXPLAIN ANALYZE ",
            " + 1",
            "[",
            "]",
            "::",
            "$1",
            "?",
        ];
        let mut chars: Vec<char> = text.chars().collect();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..=chars.len());
            match rng.random_range(0..4) {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 => chars.truncate(at),
                2 => {
                    let piece = pieces[rng.random_range(0..pieces.len())];
                    chars.splice(at..at, piece.chars());
                }
                _ => {
                    let end = rng.random_range(at..=chars.len());
                    let copy: Vec<char> = chars[at..end].to_vec();
                    chars.splice(at..at, copy);
                }
            }
        }
        chars.into_iter().collect()
    }

    /// Mutated SQL through the gate and mutated filters through the filter parser: errors,
    /// never panics, on a thread with the query runtime's stack.
    #[test]
    fn mutated_sql_and_filters_never_panic() {
        std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn(|| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(20261130);
                let (mut accepted, mut refused) = (0, 0);
                for round in 0..4000 {
                    let base = CORPUS[round % CORPUS.len()];
                    let text = mutate(base, &mut rng);
                    match crate::sql::parse_read_only(&text, 64) {
                        Ok(_) => accepted += 1,
                        Err(_) => refused += 1,
                    }
                    let filter = text.rsplit("WHERE").next().unwrap_or("");
                    let _ = crate::knn::parse_filter(filter);
                }
                // The mutations reach both sides of the gate.
                assert!(
                    accepted > 100 && refused > 100,
                    "{accepted} accepted, {refused} refused"
                );
            })
            .expect("spawn")
            .join()
            .expect("the gate panicked");
    }
}
