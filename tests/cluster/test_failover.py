"""The failover channel: one target over several endpoints, round robin, UNAVAILABLE retried.

Real gRPC servers on loopback ports that answer ``InferenceService.Classify`` and count the calls
they get, so balancing and failover are seen from the servers' side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance.client import Client, Connection
from appliance.failover import channel_options, channel_target, endpoints, service_config


class Counting(pb_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        self.calls += 1
        return pb.ClassifyResponse(model=request.model, request_id=request.request_id)


@pytest.fixture
def servers() -> Iterator[list[tuple[grpc.Server, Counting, int]]]:
    started = []
    for _ in range(3):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = Counting()
        pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, servicer, port))
    yield started
    for server, _, _ in started:
        server.stop(None)


def test_targets() -> None:
    assert channel_target("10.0.0.1:50051") == "10.0.0.1:50051"
    assert channel_target("10.0.0.1:50051, 10.0.0.2:50051") == "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    assert channel_target("[fd00::1]:1,[fd00::2]:1") == "ipv6:[fd00::1]:1,[fd00::2]:1"
    assert channel_target("dns:///appliance.internal:50051") == "dns:///appliance.internal:50051"
    assert endpoints("a:1,b:2") == ["a:1", "b:2"]
    for bad in ("a.example:1,b.example:1", "10.0.0.1:1,[fd00::1]:1", "10.0.0.1,10.0.0.2:1", "10.0.0.1:1,"):
        with pytest.raises(ValueError):
            channel_target(bad)
    assert channel_options("10.0.0.1:50051") == []  # one endpoint: the channel as before


def test_service_config_is_the_documented_json() -> None:
    config = service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert {"service": "appliance.v1.InferenceService", "method": "Classify"} in method["name"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "healthCheckConfig" not in config and "healthCheckConfig" in service_config(health_check=True)
    options = dict(channel_options("dns:///appliance.internal:50051"))
    assert json.loads(options["grpc.service_config"]) == config


@pytest.mark.integration  # real gRPC servers on loopback
def test_calls_are_balanced_and_fail_over_when_an_endpoint_dies(
    servers: list[tuple[grpc.Server, Counting, int]],
) -> None:
    address = ",".join(f"127.0.0.1:{port}" for _, _, port in servers)
    with Client(Connection(address, tls=False)) as client:
        for i in range(30):
            assert client.classify("m", ["x"], request_id=f"r{i}").request_id == f"r{i}"
        counts = [servicer.calls for _, servicer, _ in servers]
        assert all(count >= 5 for count in counts), counts  # round robin, not pick-first
        servers[0][0].stop(None)
        for i in range(30):  # none fails: refused on the dead one, retried on the others
            client.classify("m", ["x"], request_id=f"after{i}", timeout=10)
        assert sum(s.calls for _, s, _ in servers[1:]) == sum(counts[1:]) + 30
