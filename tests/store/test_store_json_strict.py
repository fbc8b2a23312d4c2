"""The store writes strict JSON (store.jsonsafe): NaN and infinities become null, numpy becomes Python."""

import json

import numpy as np

from store import Store


def test_json_results_configs_and_meta_are_strict_json(tmp_path):
    with Store(tmp_path / "s.db") as st:
        r = st.create_run("r", "x", {"lr": np.float32(0.5), "bad": float("nan"), "path": tmp_path})
        st.put_json(r, "stats", {"p": np.array([0.1, np.nan]), "n": np.int64(3), "inf": float("inf")})
        st.put_vector(r, "v", np.zeros(2), meta={"median": float("nan")})
        raw = st._conn.execute("SELECT value FROM json_results WHERE name = 'stats'").fetchone()[0]
        json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no NaN/Infinity tokens
        assert st.get_json(r, "stats") == {"p": [0.1, None], "n": 3, "inf": None}
        assert st.get_run(r)["config"] == {"lr": 0.5, "bad": None, "path": str(tmp_path)}
        assert st.vector_meta(r, "v")["median"] is None
