"""The S3 store against a real S3 endpoint over HTTP (moto_server on 127.0.0.1)."""
from __future__ import annotations

import logging
import re
import threading
import time

import boto3
import pytest
import torch

from layerquant.config import RunConfig
from layerquant.errors import ArtifactCorrupt
from layerquant.infra.s3_store import S3Store, StoreUnavailable
from support.s3server import FaultyProxy, MotoServer

SECRET = "s3cr3t-Do-Not-Leak-7f2a9c"
SETTINGS = dict(bits=3, group_size=32, nsamples=32, seqlen=256, eval_windows=8, eval_seqlen=256)


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_env(moto, monkeypatch, request):
    bucket = ("lq-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:56]).rstrip("-")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def test_round_trip_and_corruption_over_http(s3_env):
    store = S3Store.from_uri(f"s3://{s3_env}/prefix")
    tensors = {"a": torch.randn(3, 5), "codes": torch.randint(0, 255, (7,), dtype=torch.uint8)}
    ref = store.put_tensors("block", "ab" * 32, tensors, {"index": 1})
    assert store.lookup("block", "ab" * 32) == ref
    loaded, meta = store.get_tensors(ref)
    assert meta == {"index": 1}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    json_ref = store.put_json("eval", "cd" * 32, {"ppl": 4.5})
    assert store.get_json(json_ref) == {"ppl": 4.5}
    # damage the object behind the store's back: detected, discarded, never used
    boto3.client("s3").put_object(Bucket=s3_env, Key=f"prefix/{ref.uri}", Body=b"garbage")
    with pytest.raises(ArtifactCorrupt):
        store.get_tensors(ref)
    assert store.lookup("block", "ab" * 32) is None


def test_multipart_upload_round_trip(s3_env):
    store = S3Store(s3_env, "mp", multipart_threshold=5 << 20)
    big = {"w": torch.randn(3 << 20)}  # 12 MiB: three parts
    ref = store.put_tensors("block", "ef" * 32, big)
    assert torch.equal(store.get_tensors(ref)[0]["w"], big["w"])


def test_missing_bucket_is_a_clear_error(s3_env):
    with pytest.raises(StoreUnavailable, match="does not exist"):
        S3Store("no-such-bucket-here").write_bytes("x", b"1")


@pytest.mark.slow  # whole quantization runs through S3
@pytest.mark.usefixtures("prefect_server")
def test_s3_run_stores_everything_there_and_matches_the_local_run(s3_env, tmp_path, caplog):
    from layerquant.flows.quantize import quantize_flow

    caplog.set_level(logging.DEBUG)
    local = quantize_flow(RunConfig(store=str(tmp_path / "local"), out=str(tmp_path / "out_local"), **SETTINGS).model_dump())
    remote = quantize_flow(RunConfig(store=f"s3://{s3_env}/runs", out=str(tmp_path / "out_s3"), **SETTINGS).model_dump())
    assert remote["ppl_quant"] == local["ppl_quant"]
    shards = sorted(p.name for p in (tmp_path / "out_local").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "out_s3").glob("*.safetensors"))
    for shard in shards:
        assert (tmp_path / "out_s3" / shard).read_bytes() == (tmp_path / "out_local" / shard).read_bytes()
    paths = S3Store.from_uri(f"s3://{s3_env}/runs").list_paths("")
    assert sum(p.startswith("cas/block/") and p.endswith(".safetensors") for p in paths) == 5
    assert sum(p.startswith("cas/hidden/") for p in paths) == 10 and any(p.startswith("cas/calib/") for p in paths)
    assert f"runs/{remote['run_id']}/manifest.json" in paths
    # the secret is nowhere: logs, report, artifacts in the store
    assert SECRET not in caplog.text
    assert SECRET not in (tmp_path / "out_s3" / "report.json").read_text()
    store = S3Store.from_uri(f"s3://{s3_env}/runs")
    assert not any(SECRET.encode() in (store.read_bytes(p) or b"") for p in paths if p.endswith(".json"))


@pytest.mark.slow  # whole quantization runs through S3
@pytest.mark.usefixtures("prefect_server")
def test_transient_s3_outage_is_retried_and_the_run_completes(s3_env, moto, tmp_path, monkeypatch, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from layerquant.flows.quantize import quantize_flow

    reference = quantize_flow(RunConfig(store=str(tmp_path / "local"), **SETTINGS).model_dump())
    proxy = FaultyProxy(moto.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("LAYERQUANT_S3_ATTEMPTS", "1")  # let failures reach Prefect's task retries
    store = S3Store.from_uri(f"s3://{s3_env}/flaky")

    def break_after_first_block() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(p.endswith(".sha256.json") for p in store.list_paths("cas/block")):
                # more refusals than botocore's 3 attempts per operation, twice over: the first
                # operation may be the finished block's lease release, which is best-effort
                # (a failure is logged and the lease expires), so the next one must fail too
                # for a task to fail and Prefect to retry it
                proxy.refuse_next(9)
                return
            time.sleep(0.05)

    trigger = threading.Thread(target=break_after_first_block, daemon=True)
    trigger.start()
    caplog.set_level(logging.DEBUG)
    state = quantize_flow(RunConfig(store=f"s3://{s3_env}/flaky", **SETTINGS).model_dump(), return_state=True)
    trigger.join()
    proxy.close()
    report = state.result()
    assert proxy.refused > 0
    assert report["ppl_quant"] == reference["ppl_quant"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        state_names = {s.name for run in runs for s in client.read_task_run_states(run.id)}
    assert "AwaitingRetry" in state_names or "Retrying" in state_names, state_names
    assert SECRET not in caplog.text


def test_missing_credentials_fail_at_once_with_what_to_set(s3_env, monkeypatch, caplog):
    from layerquant.errors import LayerquantError

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with caplog.at_level(logging.WARNING), pytest.raises(LayerquantError, match="AWS_SECRET_ACCESS_KEY") as info:
        S3Store(s3_env).write_bytes("x", b"1")
    # at once: a configuration error is not retried (no "retrying in" warning, no backoff sleep)
    assert "retrying" not in caplog.text and not isinstance(info.value, StoreUnavailable)


@pytest.mark.parametrize("size", [10, 6 << 20])  # one PUT, and a multipart upload (S3UploadFailedError)
def test_missing_bucket_fails_at_once_without_retries(s3_env, size, caplog):
    store = S3Store("no-such-bucket-here", attempts=5, backoff_s=2.0, multipart_threshold=5 << 20)
    with caplog.at_level(logging.WARNING), pytest.raises(StoreUnavailable, match="does not exist") as info:
        store.write_bytes("x", b"1" * size)
    assert not info.value.transient  # Prefect's task retries leave it alone too
    assert "retrying" not in caplog.text


@pytest.mark.parametrize("code", ["AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "NoSuchBucket"])
def test_refusals_are_not_transient(s3_env, code):
    from botocore.stub import Stubber

    from layerquant.infra.s3_store import _is_transient

    store = S3Store(s3_env, attempts=5, backoff_s=2.0)
    with Stubber(store.client) as stub:
        # one response only: a retry would fail with the stubber's "no more responses" instead
        stub.add_client_error("get_object", service_error_code=code, http_status_code=403)
        with pytest.raises(StoreUnavailable) as info:
            store.read_bytes("x")
    assert not info.value.transient
    from botocore.exceptions import ClientError

    assert not _is_transient(ClientError({"Error": {"Code": code}}, "PutObject"))
    assert _is_transient(ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"))
