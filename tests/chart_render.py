"""A tiny stand-in for `helm template`, enough for this chart's templates and no more.

Helm cannot be installed on the development machines (DESIGN.md §7), yet the chart's
RBAC, Deployment and ConfigMap are worth checking against the code. This renders the small
subset of Go templates and Sprig functions the chart uses: `{{ }}` with `-` trimming,
`if`/`else`/`with`/`end`, `$var :=`, `.Values...`/`.Release...`/`.`/`$var`, string and
number literals, `( )`, pipelines, and the functions in FUNCTIONS. Anything else raises
`Unsupported`, so a template that starts using more fails the chart tests loudly (extend
this, or check the template another way) instead of being checked wrongly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import yaml

ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.DOTALL)
TOKEN = re.compile(r'\(|\)|\||"(?:[^"\\]|\\.)*"|[^\s()|]+')


class Unsupported(ValueError):
    pass


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")


def _indent(width: int, text: str) -> str:
    pad = " " * width
    return pad + text.replace("\n", "\n" + pad)


def _quote(value: Any) -> str:
    return '"' + (_print(value) if value is not None else "") + '"'


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "toYaml": _to_yaml,
    "indent": _indent,
    "nindent": lambda width, text: "\n" + _indent(width, text),
    "sha256sum": lambda text: hashlib.sha256(text.encode()).hexdigest(),
    "quote": _quote,
    "eq": lambda a, b: a == b,
    "and": lambda *args: next((a for a in args if not _truthy(a)), args[-1]),
    "ternary": lambda yes, no, condition: yes if condition else no,
}


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and value != [] and value != {}


def _print(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise Unsupported(f"printing {type(value).__name__} {value!r} (use toYaml)")


class _Scope:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.variables: dict[str, Any] = {}

    def term(self, token: str, dot: Any) -> Any:
        if token.startswith('"'):
            return json.loads(token)
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token in ("true", "false"):
            return token == "true"
        if token.startswith("$"):
            name, _, path = token.partition(".")
            base = self.root if name == "$" else self.variables[name]
            return _lookup(base, path)
        if token.startswith("."):
            return _lookup(dot, token[1:])
        raise Unsupported(f"term {token!r}")

    def pipeline(self, tokens: list[str], dot: Any) -> Any:
        commands: list[list[str]] = [[]]
        depth = 0
        for token in tokens:
            depth += token == "("
            depth -= token == ")"
            if token == "|" and depth == 0:
                commands.append([])
            else:
                commands[-1].append(token)
        value: Any = None
        for i, command in enumerate(commands):
            args = self.arguments(command[1:] if command[0] in FUNCTIONS else command, dot)
            if i > 0:
                args.append(value)
            if command[0] in FUNCTIONS:
                value = FUNCTIONS[command[0]](*args)
            elif len(args) == 1:
                value = args[0]
            else:
                raise Unsupported(f"command {' '.join(command)!r}")
        return value

    def arguments(self, tokens: list[str], dot: Any) -> list[Any]:
        args, i = [], 0
        while i < len(tokens):
            if tokens[i] == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                    j += 1
                args.append(self.pipeline(tokens[i + 1:j - 1], dot))
                i = j
            else:
                args.append(self.term(tokens[i], dot))
                i += 1
        return args


def _lookup(base: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        base = base.get(part) if isinstance(base, dict) else None
    return base


def _parse(template: str) -> list[Any]:
    """Nodes: str (text), ("out", tokens), ("assign", name, tokens),
    ("if"|"with", tokens, body, else_body)."""
    root: list[Any] = []
    stack: list[tuple[list[Any], Any]] = [(root, None)]
    pos, trim_next = 0, False
    for match in ACTION.finditer(template):
        text = template[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        stack[-1][0].append(text)
        pos, trim_next = match.end(), bool(match.group(3))
        tokens = TOKEN.findall(match.group(2))
        if tokens[0] in ("if", "with"):
            node = [tokens[0], tokens[1:], [], []]
            stack[-1][0].append(node)
            stack.append((node[2], node))
        elif tokens[0] == "else":
            _, node = stack.pop()
            stack.append((node[3], node))
        elif tokens[0] == "end":
            stack.pop()
        elif len(tokens) > 2 and tokens[0].startswith("$") and tokens[1] == ":=":
            stack[-1][0].append(["assign", tokens[0], tokens[2:]])
        elif tokens[0] in ("range", "define", "template", "include", "block", "tpl"):
            raise Unsupported(f"action {tokens[0]!r}")
        else:
            stack[-1][0].append(["out", tokens])
    text = template[pos:]
    root.append(text.lstrip() if trim_next else text)
    if len(stack) != 1:
        raise Unsupported("unbalanced if/with/end")
    return root


def _run(nodes: list[Any], scope: _Scope, dot: Any, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "out":
            out.append(_print(scope.pipeline(node[1], dot)))
        elif node[0] == "assign":
            scope.variables[node[1]] = scope.pipeline(node[2], dot)
        else:
            value = scope.pipeline(node[1], dot)
            inner = value if node[0] == "with" else dot
            _run(node[2] if _truthy(value) else node[3], scope,
                 inner if _truthy(value) else dot, out)


def render(template: str, values: dict[str, Any], release: str = "dhpc",
           namespace: str = "hpc") -> str:
    root = {"Values": values, "Release": {"Name": release, "Namespace": namespace}}
    out: list[str] = []
    _run(_parse(template), _Scope(root), root, out)
    return "".join(out)


def render_documents(template: str, values: dict[str, Any], **release: str) -> list[Any]:
    """The YAML documents a template renders to (empty ones dropped)."""
    return [d for d in yaml.safe_load_all(render(template, values, **release)) if d]
