"""The dispatcher's handling of workers, with real ZeroMQ sockets on loopback."""

import threading

import zmq

from liveindex.stream.protocol import decode, encode
from liveindex.stream.publisher import Publisher

from ..fake_modality import FakeModality, FakeSource


def test_every_worker_gets_the_scan_start_before_its_first_page():
    """A worker builds a scan's indexer (seconds for a new geometry) when it hears of the scan;
    one without a free slot must hear of it at once, not with the first page it is sent."""
    context = zmq.Context()
    sink = context.socket(zmq.ROUTER)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    publisher = Publisher(sink=f"tcp://127.0.0.1:{port}", context=context, page_size=16, stop_event=stop)
    workers = {}
    for name, slots in (("free", 2), ("busy", 0)):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, name.encode())
        sock.connect(publisher.endpoint)
        sock.send_multipart(encode("credit", {"worker": name, "pages": slots, "done": []}))
        workers[name] = sock
    thread = threading.Thread(target=publisher.run, args=(FakeSource(FakeModality(), (4, 4)),),
                              kwargs={"scan_id": "scan-a"}, daemon=True)
    thread.start()
    try:
        heard = {}
        for name, sock in workers.items():
            kinds = []
            while sock.poll(10_000) and "scan_start" not in kinds:
                kinds.append(decode(sock.recv_multipart()).kind)
            heard[name] = kinds
        assert heard["busy"] == ["scan_start"], heard
        assert heard["free"][0] == "scan_start", heard
    finally:
        stop.set()
        thread.join(10)
        for sock in (*workers.values(), sink):
            sock.close(linger=0)
        publisher.close()
