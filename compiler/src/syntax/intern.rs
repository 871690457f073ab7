//! Assigns every name in a parsed file its [`Symbol`].

use super::ast::*;
use std::collections::HashMap;

/// Interns every identifier of `file` in place; returns how many distinct
/// names there are (symbols are `0..count`).
pub fn intern(file: &mut File) -> u32 {
    let mut table = Table::default();
    for item in &mut file.items {
        match item {
            Item::Function(f) => {
                table.ident(&mut f.name);
                for (p, _) in &mut f.params {
                    table.ident(p);
                }
                table.expr(&mut f.body);
            }
            Item::Schedule(s) => {
                table.ident(&mut s.name);
                for p in &mut s.params {
                    table.ident(&mut p.name);
                }
                for d in &mut s.decls {
                    table.decl(d);
                }
            }
        }
    }
    table.symbols.len() as u32
}

#[derive(Default)]
struct Table {
    symbols: HashMap<String, Symbol>,
}

impl Table {
    fn ident(&mut self, ident: &mut Ident) {
        let next = Symbol(self.symbols.len() as u32);
        ident.sym = *self.symbols.entry(ident.name.clone()).or_insert(next);
    }

    fn decl(&mut self, d: &mut Decl) {
        match d {
            Decl::Stages { count, .. } => self.expr(count),
            Decl::Place { var, rank, .. } => {
                self.ident(var);
                self.expr(rank);
            }
            Decl::Require { cond, .. } | Decl::Pipelines { count: cond, .. } => self.expr(cond),
            Decl::Route { var, pipeline, .. } => {
                self.ident(var);
                self.expr(pipeline);
            }
            Decl::Auto { .. } | Decl::RecomputeAuto { .. } => {}
            Decl::Memory { fields, .. } | Decl::Cost { fields, .. } => {
                for setting in fields {
                    self.ident(&mut setting.name);
                    if let Some(index) = &mut setting.index {
                        self.ident(index);
                    }
                    self.expr(&mut setting.value);
                }
            }
            Decl::Check { axes, .. } => {
                for axis in axes {
                    self.ident(&mut axis.name);
                    match &mut axis.values {
                        CheckValues::Range { start, end, .. } => {
                            self.expr(start);
                            self.expr(end);
                        }
                        CheckValues::List(items) => items.iter_mut().for_each(|e| self.expr(e)),
                    }
                }
            }
            Decl::Rank { var, body, .. } => {
                self.ident(var);
                self.block(body);
            }
        }
    }

    fn block(&mut self, block: &mut Block) {
        for stmt in block {
            match &mut stmt.kind {
                StmtKind::Let(name, value) => {
                    self.ident(name);
                    self.expr(value);
                }
                StmtKind::For { var, start, end, body, .. } => {
                    self.ident(var);
                    self.expr(start);
                    self.expr(end);
                    self.block(body);
                }
                StmtKind::Repeat { count, body } => {
                    self.expr(count);
                    self.block(body);
                }
                StmtKind::Reorder(body) => self.block(body),
                StmtKind::If { cond, then, otherwise } => {
                    self.expr(cond);
                    self.block(then);
                    self.block(otherwise);
                }
                StmtKind::Op(calls) => {
                    for call in calls {
                        self.ident(&mut call.name);
                        for arg in call.args.iter_mut().flatten() {
                            if let Some(n) = &mut arg.name {
                                self.ident(n);
                            }
                            self.expr(&mut arg.value);
                        }
                    }
                }
                StmtKind::Error => {}
            }
        }
    }

    fn expr(&mut self, e: &mut Expr) {
        match &mut e.kind {
            ExprKind::Var(name) => self.ident(name),
            ExprKind::Unary(_, a) => self.expr(a),
            ExprKind::Binary(_, a, b) => {
                self.expr(a);
                self.expr(b);
            }
            ExprKind::If(c, a, b) => {
                self.expr(c);
                self.expr(a);
                self.expr(b);
            }
            ExprKind::Call(name, args) => {
                self.ident(name);
                args.iter_mut().for_each(|a| self.expr(a));
            }
            ExprKind::Int(_) | ExprKind::Real(_) | ExprKind::Bool(_) | ExprKind::Error => {}
        }
    }
}
