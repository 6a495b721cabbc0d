"""Load test of ``prism-rt serve``: N concurrent tritonclient clients (HTTP and gRPC) send M requests
in all to a server this script starts on loopback, once per server configuration (dynamic batching
off: ``--max-batch-size 1``; on: ``--max-batch-size 4``). Every response is checked against the
Python API's counterfactual of its own input (three inputs in turn, so a mixed-up response shows).
Reports errors, mix-ups, throughput, p50/p95 latency and the server's RSS (with Triton and its
stub) before and after; a JSON row per run and a table. Exits non-zero on any error or mix-up.

    .venv/bin/python benchmarks/serve_load.py --clients 8 --requests 100 --steps 3
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ("phantom-1000003.png", "Chest X-ray showing No Finding, Support Devices", "Chest X-ray showing No Finding"),
    ("phantom-1000005.png", "Chest X-ray showing No Finding, Support Devices", "Chest X-ray showing No Finding"),
    ("phantom-1000006.png", "Chest X-ray showing Cardiomegaly, Pleural Effusion, Support Devices",
     "Chest X-ray showing Cardiomegaly, Pleural Effusion"),
]


def expected_outputs(engine_dir: Path, steps: int, threads: int) -> list[np.ndarray]:
    from prism_rt.config import ControlConfig, OrtOptions
    from prism_rt.engine import Engine
    from prism_rt.imageio import to_uint

    engine = Engine.from_dir(engine_dir, options=OrtOptions(threads=threads))
    out = []
    for name, prompt, target in CASES:
        inversion = engine.invert(engine_dir / "images" / name, prompt, sampler=engine.sampler(steps=steps))
        result = engine.edit(inversion, [target], ControlConfig(self_replace=(0.5,)))
        out.append(np.stack([to_uint(image, 16) for image in result.images("input")]))
    return out


def run_load(server, protocol: str, clients: int, requests: int, levels, expected, params) -> dict:
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    from prism_rt.serve_client import decode, request_inputs

    module, url = (http, server.http_url) if protocol == "http" else (grpc, server.grpc_url)
    jobs = [k % len(CASES) for k in range(requests)]

    def client_loop(worker: int) -> list[tuple]:
        client = module.InferenceServerClient(url, **({"network_timeout": 600} if protocol == "http" else {}))
        rows = []
        for case in jobs[worker::clients]:
            _, prompt, target = CASES[case]
            start = time.perf_counter()
            try:
                images, report = decode(client.infer("prism", request_inputs(module, levels[case], prompt, [target],
                                                                           params)))
                diff = int(np.abs(images.astype(np.int32) - expected[case].astype(np.int32)).max())
                rows.append((time.perf_counter() - start, None, diff, report["settings"]["requests_in_call"]))
            except Exception as exc:  # counted and shown, never swallowed: the run fails below
                rows.append((time.perf_counter() - start, f"{type(exc).__name__}: {str(exc)[-300:]}", None, 0))
        client.close()
        return rows

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [row for part in pool.map(client_loop, range(clients)) for row in part]
    wall = time.perf_counter() - start
    latencies = np.array([r[0] for r in rows])
    errors = [r[1] for r in rows if r[1] is not None]
    diffs = [r[2] for r in rows if r[2] is not None]
    return {"protocol": protocol, "clients": clients, "requests": len(rows), "errors": len(errors),
            "first_error": errors[0] if errors else None, "mixed_up": sum(d > 1 for d in diffs),
            "max_diff_levels": max(diffs) if diffs else None, "wall_s": round(wall, 2),
            "throughput_rps": round(len(rows) / wall, 2), "p50_s": round(float(np.percentile(latencies, 50)), 3),
            "p95_s": round(float(np.percentile(latencies, 95)), 3),
            "mean_requests_per_call": round(float(np.mean([r[3] for r in rows if r[1] is None] or [0])), 2)}


def main(argv=None) -> int:
    from PIL import Image

    from prism_rt.serve_client import ServerProcess

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, default=ROOT / "engines" / "phantom-demo")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100, help="requests per protocol and configuration")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the server's onnxruntime threads")
    parser.add_argument("--protocols", default="http,grpc")
    parser.add_argument("--batch-sizes", default="1,4", help="--max-batch-size of each server configuration")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    params = {"steps": args.steps, "self_replace": [0.5]}
    levels = [np.asarray(Image.open(args.engine / "images" / name)).astype(np.uint16) for name, _, _ in CASES]
    expected = expected_outputs(args.engine, args.steps, args.threads)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        with ServerProcess(args.engine, "--threads", str(args.threads), "--max-batch-size", str(batch),
                           "--queue-delay-us", "20000", "--no-progress", log=f"/tmp/serve_load_b{batch}.log") as server:
            rss_before = server.rss_mb()
            for protocol in args.protocols.split(","):
                row = run_load(server, protocol, args.clients, args.requests, levels, expected, params)
                row.update(max_batch_size=batch, rss_before_mb=round(rss_before, 1),
                           rss_after_mb=round(server.rss_mb(), 1), steps=args.steps, threads=args.threads)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": __import__("os").cpu_count()}
    print(f"\n{meta}\n| batching | protocol | requests | errors | mixed up | req/s | p50 s | p95 s | req/call | "
          "RSS before → after MB |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| max {r['max_batch_size']} | {r['protocol']} | {r['requests']} ({r['clients']} clients) | {r['errors']} | "
              f"{r['mixed_up']} | {r['throughput_rps']} | {r['p50_s']} | {r['p95_s']} | {r['mean_requests_per_call']} | "
              f"{r['rss_before_mb']} → {r['rss_after_mb']} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    failed = [r for r in rows if r["errors"] or r["mixed_up"]]
    for r in failed:
        print(f"FAILED: {r['protocol']} max-batch {r['max_batch_size']}: {r['errors']} errors "
              f"({r['first_error']}), {r['mixed_up']} mixed up", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
