"""Diagnostics: every problem the compiler finds, with a code, a position and a hint.

Codes come in ranges by stage: MESH1xx syntax, 2xx schema, 3xx references and
contracts, 4xx policy, 5xx plan. `CODES` maps each code to its help text; a test
checks that every code the compiler uses is listed there.

A diagnostic renders as

    mesh.yaml:12:5: error[MESH302]: product 'biopsies' names unknown domain 'charit'
       12 |     domain: charit
          |             ^
      hint: did you mean 'charite'?
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Severity = Literal["error", "warning"]

CODES: dict[str, str] = {
    # 1xx: reading and YAML syntax
    "MESH101": "The file is not valid YAML; fix the syntax at the position shown.",
    "MESH102": "A mapping has the same key twice; YAML would silently keep only the last one.",
    "MESH103": "A tab character is used for indentation; YAML indentation must use spaces.",
    "MESH104": "The file cannot be read: it does not exist, is a directory, or is not UTF-8 text.",
    "MESH105": "The file is empty; a mesh.yaml needs at least apiVersion and mesh.",
    "MESH106": "An alias points back into itself, or expands to an unreasonably large document.",
    "MESH107": "The document nests mappings or lists deeper than meshctl reads (100 levels); "
               "a mesh.yaml needs only a few, so the file was generated wrongly or a bracket is "
               "unclosed.",
    "MESH108": "An `include` names a file that does not exist, a glob that matches no file, or "
               "a file that cannot be read; paths are relative to mesh.yaml's directory.",
    "MESH109": "An `include` points outside mesh.yaml's directory (an absolute path, `..`, or a "
               "link that leads out); a mesh's files live in its own directory.",
    "MESH110": "An `include` names mesh.yaml itself: a cycle. Included files cannot include "
               "further files, so this is the only cycle there can be.",
    "MESH111": "A section is not allowed in an included file: included files hold domains "
               "(with their local policies), products and contracts; policies, models, "
               "analyses, grants, `mesh` and `include` stay in mesh.yaml, with governance.",
    # 2xx: schema
    "MESH201": "The top level of a mesh.yaml must be a mapping of sections.",
    "MESH202": "A key is not part of the mesh.yaml language; unknown keys are errors, not ignored.",
    "MESH203": "A required key is missing.",
    "MESH204": "A value has the wrong type or is out of range.",
    "MESH205": "apiVersion must be `meshctl/v1`.",
    "MESH206": "A value is not one of the allowed choices.",
    "MESH207": "`pii` must be `direct`, `indirect` or `none`; `pii: true` does not say which.",
    "MESH208": "An SLA value is malformed: a duration is a number and a unit (30m, 12h, 7d, 2w, "
               "5y), an availability a percentage (99.9%).",
    "MESH209": "A `range` is invalid: it needs low <= high (low < high for a metric's bins) and "
               "a numeric (int or float) column.",
    "MESH210": "`masking` applies only to `pii: indirect` columns; direct identifiers are never "
               "selected and other columns are not masked.",
    "MESH211": "`generalize` is required exactly when `masking: generalize`, and must fit the "
               "column type: year|month (date, timestamp), prefix:N (string), bucket:W (int, "
               "float).",
    "MESH212": "A sqlite:, duckdb: or postgresql:// source needs `table`; a csv or parquet file "
               "source must not have one.",
    "MESH213": "A quality rule is incomplete: a library rule needs a `metric`, a sql rule a "
               "`query`.",
    "MESH214": "A library or sql quality rule needs exactly one ODCS operator (mustBe, "
               "mustBeLessThan, mustBeBetween, ...).",
    "MESH215": "A quality rule's options do not fit its metric: nullValues, missingValues and "
               "invalidValues need a column, rowCount takes none, validValues/validRange/pattern "
               "go only with invalidValues, missingValues only with the missingValues metric.",
    "MESH216": "A sql quality rule's query uses an unknown placeholder; only {object} (the "
               "product's table) and {property} (the rule's column) are replaced.",
    "MESH217": "An address is malformed: the coordinator's must be tcp://HOST:PORT, a domain's "
               "`local` (forked by `meshctl up`) or tcp://HOST[:PORT] (its daemon runs on its own host).",
    "MESH218": "A remote domain (address tcp://...) declares no public_key, so the coordinator could "
               "not tell its daemon from anyone else's; run `meshctl keys generate DOMAIN` on the "
               "domain's host and paste the public_key line it prints.",
    "MESH219": "A public_key is not a CurveZMQ public key: 40 Z85 characters, as printed by "
               "`meshctl keys generate` or `meshctl keys show`.",
    "MESH220": "A `local` domain declares a public_key; `meshctl up` forks local domains with a key "
               "made per run, so the key would be ignored. Remove it, or give the domain's host as "
               "its address.",
    "MESH222": "`mesh.owner` is not a CODEOWNERS owner: an email address, @user or @org/team.",
    # 3xx: references and contracts
    "MESH301": "Two items of the same kind have the same name (or id).",
    "MESH302": "A reference names a domain that is not declared.",
    "MESH303": "A reference names a contract that is not declared.",
    "MESH304": "A contract is declared, but not with the referenced major version.",
    "MESH305": "A model's feature or target is not a column of its contract.",
    "MESH306": "A feature glob pattern matches no column of the contract.",
    "MESH307": "A product's source file does not exist (paths are relative to the mesh.yaml).",
    "MESH308": "A participant domain publishes no product (or more than one) under the model's contract.",
    "MESH309": "A column or feature is listed twice, or the target is also a feature.",
    "MESH310": "A quality rule or evaluation setting names a column the contract does not have.",
    "MESH311": "A grant names a product (<domain>.<name>) that is not declared.",
    "MESH312": "A grant names a model or analysis that is not declared.",
    "MESH313": "An analysis' group_by or metric column is not a column of its contract.",
    "MESH321": "A product lacks a column its contract requires.",
    "MESH322": "A product column's type differs from the contract's.",
    "MESH323": "A product's category values are not allowed by its contract.",
    "MESH324": "A product under a contract does not name a contract version.",
    "MESH325": "A model or analysis uses an optional contract column (required: false) that a "
               "participant's product does not have.",
    # 4xx: policy
    "MESH401": "A PII column (direct or indirect) is used as a model feature; PII never trains a model.",
    "MESH402": "A PII column (direct or indirect) is used as a model target.",
    "MESH403": "A PII column (direct or indirect) is grouped by or aggregated in an analysis; "
               "PII never leaves a domain, not even as a group key or an aggregate.",
    "MESH404": "A grant's purpose differs from the purpose of the model or analysis it names.",
    "MESH405": "A model or analysis reads an `access: request` product without a grant; ask "
               "with `meshctl access request` and merge the grant into mesh.yaml.",
    "MESH410": "A policy with effect deny does not hold for a model, analysis or product.",
    "MESH411": "A policy with effect warn does not hold for a model, analysis or product.",
    "MESH412": "A policy's CEL expression has a syntax error.",
    "MESH413": "A policy's CEL expression failed to evaluate (unknown field, wrong types, ...).",
    "MESH414": "A policy's `when` or `require` did not evaluate to a bool.",
    # 5xx: plan
    "MESH501": "A product's source format is not supported by the plan (csv and parquet files, "
               "sqlite:PATH, duckdb:PATH and postgresql:// URIs are).",
    "MESH502": "A model's target fits no task: it must be a category with declared values (classification, "
               "binary) or an int or float column (regression).",
    "MESH503": "A model's feature cannot feed a model: date and timestamp columns never can; a string column "
               "needs a cap on its one-hot width (`inputs.categories: {COLUMN: N}`).",
    "MESH504": "A model declares a quorum larger than its number of participants.",
    "MESH505": "A model's entrypoint cannot be imported or built: the module is not found beside the "
               "mesh.yaml or on sys.path, it has no such callable, the factory raised, or it returned no nn.Module.",
    "MESH506": "A model or analysis has no participants.",
    "MESH507": "An analysis groups by a column that is not a category; groups must be declared "
               "values.",
    "MESH508": "An analysis aggregates a column that is not numeric (int or float).",
    "MESH509": "A histogram or quantile metric needs a range: on the metric or on the contract "
               "column.",
    "MESH510": "An aggregation setting belongs to another strategy: mu to fedprox; server_lr "
               "to fedadam, fedyogi and fedavgm; beta_1, beta_2 and tau to fedadam and fedyogi; "
               "server_momentum to fedavgm; trim to trimmed_mean; byzantine to krum, multi_krum "
               "and bulyan; select to multi_krum; radius and iterations to centered_clip.",
    "MESH511": "Krum and Multi-Krum tolerating f Byzantine updates need at least 2f + 3 updates "
               "per round, Bulyan 4f + 3 (participants, and quorum when declared); with fewer, "
               "honest updates cannot outvote the Byzantine ones.",
    "MESH512": "A model trained with DP (DP-SGD) uses a setting DP does not cover: an optimizer "
               "other than sgd, or `standardize` (which sends exact feature sums).",
    "MESH513": "A model with secure aggregation needs what the coordinator cannot see: a robust "
               "strategy (median, trimmed_mean, krum, multi_krum, bulyan, centered_clip: each "
               "needs every single update, the coordinator sees only their sum; fedavgm needs only "
               "the sum) or a round policy on update norms; or it has "
               "fewer than 3 participants per round, so one could subtract its own update from the "
               "aggregate.",
    "MESH514": "An evaluation metric does not fit the model's task: loss, accuracy, auroc, f1, precision, "
               "recall for classification and binary; loss, mae, rmse, r2 for regression (docs/evaluation.md).",
    "MESH515": "trimmed_mean cuts floor(trim x updates) from each end per coordinate; with "
               "the model's participants (or quorum) that is 0, so it is a plain unweighted mean.",
    "MESH531": "A `personalization.local` glob matches none of the model's tensors, or the globs "
               "match all of them (nothing would be shared), or `personalization` declares nothing "
               "personal (no local layers, no fine-tuning) or a fine_tune_lr without fine_tune_epochs.",
    "MESH532": "A model trained with DP declares `personalization.fine_tune_epochs`: fine-tuning "
               "trains outside the DP accountant.",
    "MESH516": "multi_krum averages `select` updates per round, so `select` can be at most the "
               "model's participants (or quorum); leave it out for n - f.",
    "MESH517": "A model has state (parameters or buffers) that is not float32; only float32 state is "
               "federated (BatchNorm's int64 num_batches_tracked: use track_running_stats=False or GroupNorm).",
    "MESH518": "A model's architecture keys do not fit: `entrypoint` must be `package.module:factory`, `args` "
               "(JSON scalars and lists) is for an entrypoint, and each built-in kind takes only its own keys.",
    "MESH519": "A model does not fit its input or output: `kind: cnn` needs one [C, H, W] tensor input, and "
               "a model's forward must map [n, *input_shape] to [n, output_dim].",
    "MESH520": "A tensor column needs `shape:` (1 to 3 positive sizes); no other column type has a shape.",
    "MESH521": "`inputs.categories` names a column that is not a category or string feature of the model, "
               "or caps one outside 1 to 10000 values.",
    "MESH522": "A product's tensor column has another shape than its contract declares.",
    "MESH523": "The vocabulary of a model's category or string features cannot be agreed or used: under DP "
               "(it is agreed from exact value counts, which DP does not cover), or for an evaluation product in "
               "a domain that does not train (only training domains receive it).",
    "MESH524": "A model with `data: stream` trains with DP: DP-SGD's accounting needs Poisson "
               "sampling over all rows, which streamed batches do not give (docs/streaming.md).",
    "MESH525": "`buffer_rows` must hold at least one batch (batch_size rows) and applies only to "
               "streamed data (`data: stream` or `auto`).",
    "MESH526": "A model with `data: stream` reads a sqlite or postgresql product, whose rows are "
               "copied into memory before DuckDB reads them; stream parquet, csv or duckdb sources.",
    "MESH527": "A model's declared task does not fit its target: classification needs a category target, "
               "binary a category of exactly 2 values, regression an int or float target.",
    "MESH528": "A model's loss does not fit its task: cross_entropy is classification's, bce binary's, "
               "mse, mae and huber regression's.",
    "MESH529": "`huber_delta` is a setting of `loss: huber` only.",
    "MESH534": "A model trained with DP has a BatchNorm layer: it mixes the examples of a batch, so "
               "per-example gradients (DP-SGD) are undefined; use GroupNorm or LayerNorm.",
    "MESH535": "A model's evaluation product (evaluation.product) is not a product, is also a training "
               "product, or lacks the model's features and target (same types and classes, not PII).",
    "MESH536": "cross_site evaluation sends each domain's local model to the other domains, which secure "
               "aggregation and DP exist to prevent.",
    "MESH537": "A model with an evaluation product standardizes features: the product's domain does not "
               "train, so it gets no mesh-wide statistics to score with.",
    "MESH538": "A model keeps personal layers (personalization.local) in each domain and declares cross_site "
               "evaluation or an evaluation product: a personal model never leaves its domain.",
    "MESH540": "A secure aggregation threshold must be more than half of a round's participants (else two "
               "disjoint groups could each rebuild masks) and at most all of them (docs/secure-aggregation.md).",
    "MESH541": "A model's quorum is below its secure aggregation threshold: a round could go on with fewer "
               "masked updates than the shares needed to unmask them.",
    "MESH542": "A secure aggregation threshold is declared but the quorum is every participant, so no round "
               "goes on without a dropped domain: set a quorum between the threshold and n - 1.",
    "MESH543": "`effect: exclude` leaves one domain's update out of a round, so only a `scope: round` policy "
               "has it; `suspend_after` counts those exclusions, and the variable `update` is bound per update, "
               "so both need `effect: exclude` (docs/governance.md).",
    "MESH544": "A round policy with `effect: exclude` applies to a model with secure aggregation: the coordinator "
               "sees only the sum of the updates, not the single update it would exclude.",
    "MESH546": "A model with client-level DP (`privacy.client_dp`) also declares record-level `dp`, "
               "`standardize` or cross_site evaluation, which send what its noise does not cover (docs/privacy.md).",
    "MESH547": "Client-level DP noises the mean of clipped updates; a robust strategy (median, krum, ...) needs "
               "each single update: use fedavg, fedprox, fedavgm, fedadam or fedyogi.",
    "MESH548": "Client-level DP with `client_dp.noise: domain` splits the noise among the domains; each share "
               "hides an update only inside secure aggregation's sum, so it needs `secure_aggregation: true`.",
    "MESH545": "A round policy may exclude updates of a model whose quorum is every participant: a round "
               "with an exclusion (or after a suspension) has fewer updates than the quorum and fails.",
    "MESH549": "A scaffold model uses secure aggregation: each domain's control variate change would travel "
               "unmasked beside its masked update, so the two are refused together.",
    "MESH550": "A scaffold model trains with adam, DP-SGD, client-level DP or compression: its option II "
               "control variates assume plain SGD steps corrected by c - c_i and full, unnoised updates.",
    "MESH551": "A model's `sampling` draws more participants than it has, fewer than its quorum, or fewer "
               "than its strategy needs per round (krum 2f + 3, bulyan 4f + 3, secure aggregation 3).",
    "MESH552": "A model compresses its updates (`compression`) and uses secure aggregation, whose masks cover the "
               "full fixed-point update: a compressed update cannot be masked.",
    "MESH553": "A model sends top-k compressed updates to median, trimmed_mean or bulyan, each of which would "
               "read the values a domain did not send as 0 (docs/compression.md).",
    "MESH554": "A model's `compression.k` is wrong: topk needs it, a share in (0, 1]; fp16 and int8 take no k. "
               "A k over 0.5 is a warning: top-k then sends more bytes than float32.",
    "MESH555": "A robust rule's `bucketing: s` is below 1, or leaves too few buckets (ceil(n / s) of a round's n updates) for "
               "the rule: krum and multi_krum need 2f + 3, bulyan 4f + 3, the others 3; multi_krum selects at most the buckets.",
    "MESH556": "trimmed_mean with bucketing cuts floor(trim x buckets) = 0 bucket means from each end: a plain mean "
               "of the bucket means, no longer robust.",
    "MESH560": "A split model's part or label names a product that is not declared; write `<domain>.<product>`.",
    "MESH561": "A split model's part has no key column, or its key is not a column of the part's product "
               "(a PII column may be the key: it is blinded for the intersection and never leaves in clear).",
    "MESH562": "A split model's part reads a feature that is not a column of its own product, or no feature.",
    "MESH563": "A split model's part lists a feature twice, or feeds its key or its label to a bottom model.",
    "MESH564": "A split model's feature is a PII column, or neither numeric nor categorical: bottom models read int, float, bool and category columns (one-hot over their values).",
    "MESH565": "A split model's label is in a product that is not one of its parts: the label owner must be a participant.",
    "MESH566": "A split model's label column is unknown, PII, or neither a category column with at least 2 declared values "
               "(a classification) nor an int or float column (a regression).",
    "MESH567": "A split model has two parts in the same domain: each domain contributes one part.",
    "MESH568": "A split model's parts declare their key columns with different types (say float in one domain, string in another): keys such as 123 and \"00123\" would never match and the intersection would shrink silently; declare every part's key alike.",
    "MESH569": "A split model's feature is a string column: a bottom model one-hot encodes a categorical feature over its declared values; declare it `type: category` with `values`.",
    "MESH572": "A round policy reads round.activations, round.gradients or round.batch (a split job's batch) but does not test round.kind, so it would judge federated rounds only; add `when: round.kind == \"split\"` (docs/governance.md).",
    "MESH573": "Warning: a round policy that does not test round.kind judges federated rounds only, not the batches of the mesh's split models; `when: round.kind == \"federated\"` says so.",
    "MESH574": "A round policy with `effect: exclude` would judge split jobs' batches, where no single update can be left out (the top model needs every part's activations): use deny or warn.",
    "MESH575": "A round policy compares round.kind with a value it never has: round.kind is \"federated\" or \"split\".",
    "MESH576": "A split model's entrypoint bottom model does not output [batch, k] activations (one vector per row).",
    "MESH577": "Warning: a split model's activation noise drowns its activations (noise * sqrt(width) above clip, or above 1 without a clip).",
    "MESH578": "A split model's `top.at` is neither `label_owner` (the default) nor `coordinator`.",
    "MESH579": "A split model's part reads no features: only the label owner's part may (it then holds only the label), "
               "with `top: {at: coordinator}`, and without a `bottom:`.",
    "MESH580": "Warning: the coordinator runs a split model's top model, so it learns the label of every row of the "
               "intersection: the label owner returns d loss / d logits (softmax - onehot for cross entropy). "
               "A policy can deny it: `require: model.top.at != \"coordinator\"`.",
}

SHOWN = 100
"""Most diagnostics `validate` and `plan` print as text (the JSON report has every one)."""

STAGES: dict[str, str] = {"1": "syntax", "2": "schema", "3": "references and contracts",
                          "4": "policy", "5": "plan"}
"""The compiler stage of each code range, keyed by the code's first digit."""


def normalize_code(code: str) -> str:
    """`MESH402` for `402`, `mesh402` or `MESH402`; other text comes back upper-cased."""
    code = code.strip().upper()
    return f"MESH{code}" if code.isdigit() else code


def stage_of(code: str) -> str:
    """The stage a code belongs to (`policy` for MESH402), or `unknown`."""
    return STAGES.get(code[4:5], "unknown")


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a mesh.yaml, at a 1-based line and column (0 = whole file)."""

    code: str
    severity: Severity
    message: str
    file: str
    line: int = 0
    col: int = 0
    hint: str | None = None

    @property
    def where(self) -> str:
        """`file:line:col`, or just `file` when the position is unknown."""
        return f"{self.file}:{self.line}:{self.col}" if self.line else self.file

    def render(self, source: str | None = None) -> str:
        """Head line, a numbered excerpt with a caret (given the source), then the hint."""
        return self.render_lines(source.splitlines() if source is not None else [])

    def render_lines(self, lines: Sequence[str]) -> str:
        """`render` given the source already split into lines (split once for many diagnostics)."""
        out = [f"{self.where}: {self.severity}[{self.code}]: {self.message}"]
        if 0 < self.line <= len(lines):
            text = lines[self.line - 1]
            gutter = f"{self.line:>5} | "
            pad = "".join("\t" if ch == "\t" else " " for ch in text[: max(self.col - 1, 0)])
            out += [gutter + text, " " * (len(gutter) - 2) + "| " + pad + "^"]
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


def render_all(diagnostics: Iterable[Diagnostic], source: str | Mapping[str, str] | None = None,
               *, limit: int | None = None) -> str:
    """Every diagnostic rendered, separated by newlines; linear in diagnostics + source.

    With `limit`, only the first `limit` are rendered, then a line `... and N more`.
    """
    diags = list(diagnostics)
    shown = diags if limit is None else diags[:limit]
    if isinstance(source, Mapping):  # several files: each excerpt from its diagnostic's file
        split = {name: text.splitlines() for name, text in source.items()}
        out = [d.render_lines(split.get(d.file, [])) for d in shown]
    else:
        lines = source.splitlines() if source is not None else []
        out = [d.render_lines(lines) for d in shown]
    if len(diags) > len(shown):
        out.append(f"... and {len(diags) - len(shown)} more (--format json lists every one)")
    return "\n".join(out)


def json_report(diagnostics: Sequence[Diagnostic], *, strict: bool = False) -> dict[str, object]:
    """Diagnostics shaped like `terraform validate -json` output.

    `valid` is false on any error, or on any warning when `strict`. A diagnostic
    without a known position has no `range`, as in Terraform; a known position is
    a zero-width range (start = end), since diagnostics carry no extent.
    """
    errors = sum(d.severity == "error" for d in diagnostics)
    warnings = len(diagnostics) - errors
    return {
        "format_version": "1.0",
        "valid": not errors and not (strict and warnings),
        "error_count": errors,
        "warning_count": warnings,
        "diagnostics": [_json_diagnostic(d) for d in diagnostics],
    }


def _json_diagnostic(d: Diagnostic) -> dict[str, object]:
    out: dict[str, object] = {"severity": d.severity, "summary": d.message,
                              "detail": d.hint or "", "code": d.code}
    if d.line:
        at = {"line": d.line, "column": d.col}
        out["range"] = {"filename": d.file, "start": at, "end": dict(at)}
    return out


def did_you_mean(name: object, choices: Iterable[str]) -> str | None:
    """`did you mean 'x'?` for the closest choice, or None when nothing is close."""
    if not isinstance(name, str):
        return None
    close = difflib.get_close_matches(name, sorted(set(choices)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def quoted(names: Sequence[str], limit: int = 8) -> str:
    """`'a', 'b', 'c'` (at most `limit`, then `...`)."""
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "")


class Reporter:
    """Collects diagnostics for one file, placing each by its YAML path.

    `locate(path, key=False)` maps a path such as ("models", 0, "inputs") to a
    1-based (line, col); with `key=True` it gives the position of the key itself.
    """

    def __init__(self, file: str, locate: Locate, source: str = "") -> None:
        self.file = file
        self.locate = locate
        self.source = source
        self.diagnostics: list[Diagnostic] = []
        self.files: Callable[[YamlPath], tuple[str, str]] | None = None
        """For a mesh with includes: path -> (file shown in diagnostics, name beside mesh.yaml)."""
        self.texts: dict[str, str] = {}
        """For a mesh with includes: each file's text, by the name diagnostics show."""

    def file_of(self, path: YamlPath | None) -> str:
        """The file that declares `path`, as diagnostics name it."""
        return self.files(path)[0] if self.files is not None and path is not None else self.file

    def at(self, path: YamlPath) -> str:
        """`NAME:LINE:COL` of `path` for the plan, NAME relative to mesh.yaml's directory."""
        name = self.files(path)[1] if self.files is not None else _basename(self.file)
        line, col = self.locate(path)
        return f"{name}:{line}:{col}"

    def where(self, path: YamlPath) -> str:
        """`FILE:LINE:COL` of `path`, as diagnostics show it."""
        line, col = self.locate(path)
        return f"{self.file_of(path)}:{line}:{col}"

    def text_of(self, path: YamlPath) -> str:
        """The text of the file that declares `path`."""
        return self.texts.get(self.file_of(path), self.source) if self.texts else self.source

    def error(self, code: str, message: str, path: YamlPath | None = None, *,
              hint: str | None = None, key: bool = False, pos: tuple[int, int] | None = None,
              ) -> None:
        """Add an error at `path` (its key when `key`), or at an explicit `pos`."""
        self._add(code, "error", message, path, hint, key, pos)

    def warning(self, code: str, message: str, path: YamlPath | None = None, *,
                hint: str | None = None, key: bool = False, pos: tuple[int, int] | None = None,
                ) -> None:
        """Add a warning at `path` (its key when `key`), or at an explicit `pos`."""
        self._add(code, "warning", message, path, hint, key, pos)

    def _add(self, code: str, severity: Severity, message: str, path: YamlPath | None,
             hint: str | None, key: bool, pos: tuple[int, int] | None) -> None:
        if pos is None:
            pos = self.locate(path, key) if path is not None else (0, 0)
        line, col = pos
        file = self.file_of(path)
        self.diagnostics.append(Diagnostic(code, severity, message, file, line, col, hint))

    @property
    def has_errors(self) -> bool:
        """Whether any error (not just warnings) was reported."""
        return any(d.severity == "error" for d in self.diagnostics)


def _basename(file: str) -> str:
    return file.replace("\\", "/").rsplit("/", 1)[-1]


YamlPath = tuple[str | int, ...]
"""A position in the YAML document: keys and list indices from the root."""


class Locate(Protocol):
    """Maps a YAML path to a 1-based (line, col)."""

    def __call__(self, path: YamlPath, key: bool = False) -> tuple[int, int]: ...
