"""The service dependency graph's data structure: the part of networkx's DiGraph API we use.

`nixmox validate` and `plan FILE` build this graph for every manifest, and importing networkx
costs about 0.2 s, several times the Nix evaluation of a small manifest. The names and results
match networkx's (nodes and neighbours in insertion order, the same DFS for `find_cycle`):
tests/test_digraph.py checks them against networkx on random graphs. The step DAG of a plan
(`Plan.graph()`, walked by the executor) stays a real networkx graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, KeysView
from typing import Any, TypeAlias

# service names in practice; any hashable value, untyped as in networkx
Node: TypeAlias = Any


class NetworkXNoCycle(Exception):
    """`find_cycle` found no cycle (networkx's exception of the same name)."""


class DiGraph:
    """Nodes and directed edges with attributes; `a -> b` edges, insertion order kept."""

    def __init__(self) -> None:
        self._succ: dict[Node, dict[Node, dict[str, Any]]] = {}
        self._pred: dict[Node, dict[Node, dict[str, Any]]] = {}

    def add_node(self, node: Node) -> None:
        if node not in self._succ:
            self._succ[node] = {}
            self._pred[node] = {}

    def add_nodes_from(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            self.add_node(node)

    def add_edge(self, u: Node, v: Node, **attributes: Any) -> None:
        """An edge `u -> v` (both nodes added if new); attributes update an existing edge."""
        self.add_node(u)
        self.add_node(v)
        data = self._succ[u].setdefault(v, {})
        data.update(attributes)
        self._pred[v][u] = data

    def add_edges_from(self, edges: Iterable[tuple[Node, Node]]) -> None:
        for u, v in edges:
            self.add_edge(u, v)

    @property
    def nodes(self) -> KeysView[Node]:
        return self._succ.keys()

    def edges(self, node: Node | None = None) -> list[tuple[Node, Node]]:
        """Every edge, or the edges out of `node`, in insertion order."""
        sources = self._succ if node is None else [node]
        return [(u, v) for u in sources for v in self._neighbours(self._succ, u)]

    def successors(self, node: Node) -> Iterator[Node]:
        return iter(self._neighbours(self._succ, node))

    def predecessors(self, node: Node) -> Iterator[Node]:
        return iter(self._neighbours(self._pred, node))

    def __contains__(self, node: object) -> bool:
        try:
            return node in self._succ
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Node]:
        return iter(self._succ)

    def __len__(self) -> int:
        return len(self._succ)

    @staticmethod
    def _neighbours(
        adjacency: dict[Node, dict[Node, dict[str, Any]]], node: Node
    ) -> dict[Node, dict[str, Any]]:
        try:
            return adjacency[node]
        except KeyError:
            raise KeyError(f"the node {node!r} is not in the graph") from None


def _reachable(adjacency: dict[Node, dict[Node, Any]], source: Node) -> set[Node]:
    if source not in adjacency:
        raise KeyError(f"the node {source!r} is not in the graph")
    seen: set[Node] = set()
    stack = [source]
    while stack:
        for neighbour in adjacency[stack.pop()]:
            if neighbour not in seen:
                seen.add(neighbour)
                stack.append(neighbour)
    seen.discard(source)
    return seen


def descendants(graph: DiGraph, source: Node) -> set[Node]:
    """Every node reachable from `source` (itself excluded)."""
    return _reachable(graph._succ, source)


def ancestors(graph: DiGraph, source: Node) -> set[Node]:
    """Every node that reaches `source` (itself excluded)."""
    return _reachable(graph._pred, source)


def is_directed_acyclic_graph(graph: DiGraph) -> bool:
    """Whether the graph has no cycle (Kahn's algorithm)."""
    waiting = {node: len(graph._pred[node]) for node in graph.nodes}
    ready = [node for node, count in waiting.items() if count == 0]
    done = 0
    while ready:
        node = ready.pop()
        done += 1
        for successor in graph._succ[node]:
            waiting[successor] -= 1
            if waiting[successor] == 0:
                ready.append(successor)
    return done == len(graph)


def _edge_dfs(graph: DiGraph, start: Node) -> Iterator[tuple[Node, Node]]:
    """Every edge reachable from `start`, depth first (networkx's `edge_dfs`)."""
    visited_edges: set[tuple[Node, Node]] = set()
    pending: dict[Node, Iterator[tuple[Node, Node]]] = {}
    stack = [start]
    while stack:
        current = stack[-1]
        if current not in pending:
            pending[current] = iter(graph.edges(current))
        edge = next(pending[current], None)
        if edge is None:
            stack.pop()
        elif edge not in visited_edges:
            visited_edges.add(edge)
            stack.append(edge[1])
            yield edge


def find_cycle(graph: DiGraph, source: Node) -> list[tuple[Node, Node]]:
    """The edges of the first cycle a depth-first walk from `source` meets (as networkx)."""
    edges: list[tuple[Node, Node]] = []
    active = {source}
    previous_head: Node | None = None
    for tail, head in _edge_dfs(graph, source):
        if previous_head is not None and tail != previous_head:
            # backtracked: drop the path back to the edge whose head is this tail
            while True:
                if not edges:
                    active = {tail}
                    break
                active.remove(edges.pop()[1])
                if edges and edges[-1][1] == tail:
                    break
        edges.append((tail, head))
        if head in active:
            start = next(i for i, edge in enumerate(edges) if edge[0] == head)
            return edges[start:]
        active.add(head)
        previous_head = head
    raise NetworkXNoCycle("No cycle found.")
