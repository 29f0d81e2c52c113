"""A userspace link impairer: forwards Ethernet frames between two TAP devices in two network
namespaces with a one-way delay, random frame loss, an optional rate cap, and a switch that
takes the link down (every frame dropped, frames in flight lost) and up again.

The kernel here has no `netem`, so this stands in for it. Loss is per frame, as on a real link,
so TCP (and with it ZeroMQ) sees real retransmissions, not a relay's reliable byte stream.

Run it as a process (the test harness does, see netlab.py):

    python impair.py NS_A TAP_A NS_B TAP_B [--delay S] [--loss P] [--rate BITS_PER_S] [--seed N]

It opens the existing (persistent) TAP device TAP_A in network namespace NS_A and TAP_B in NS_B,
prints `ready` on stdout and then reads commands, one a line, on stdin:

    down                          drop every frame until `up` (a cut cable; frames in flight are lost)
    up
    set delay=0.05 loss=0.05 rate=0   change the impairment (one-way delay in seconds, loss as a fraction,
                                  rate in bit/s, 0 = no cap); each key is optional
    stats                         print `stats a2b_frames=… a2b_bytes=… b2a_frames=… b2a_bytes=… dropped=…`
    bytes T1 T2                   print `bytes N`: the bytes of the frames forwarded (both ways) after
                                  wall time T1 (time.time()) up to T2

End of stdin or SIGTERM ends it. Delay and loss apply to both directions independently.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import heapq
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
QUEUE_LIMIT = 4096
"""Frames held per direction; beyond this a frame is dropped (a router's tail drop)."""

_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move this process (its only thread) into network namespace `name` (as `ip netns exec` does)."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tap(netns: str, name: str) -> int:
    """A non-blocking fd of the existing TAP device `name` in namespace `netns`."""
    enter_netns(netns)  # /dev/net/tun binds the device lookup to the netns of the opener
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Link:
    """Both directions of one impaired link: a delay queue per direction, loss, rate and up/down."""

    def __init__(self, a: int, b: int, delay: float, loss: float, rate: float, seed: int):
        self.a, self.b = a, b
        self.delay, self.loss, self.rate = delay, loss, rate
        self.up = True
        self.rng = random.Random(seed)
        self.queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, out fd, frame)
        self.seq = 0
        self.busy_until = {a: 0.0, b: 0.0}
        self.held = {a: 0, b: 0}
        self.sent = {a: [0, 0], b: [0, 0]}  # by input fd: frames, bytes forwarded
        self.dropped = 0
        self.log: list[tuple[float, int]] = []  # (wall time, frame bytes) of every forwarded frame

    def take(self, src: int) -> None:
        """Read every frame waiting on `src` and queue (or drop) each."""
        while True:
            try:
                frame = os.read(src, 65536)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EIO):  # EIO: the device is down
                    return
                raise
            now = time.monotonic()
            if not self.up or (self.loss and self.rng.random() < self.loss) or self.held[src] >= QUEUE_LIMIT:
                self.dropped += 1
                continue
            depart = now
            if self.rate:
                depart = max(now, self.busy_until[src]) + len(frame) * 8 / self.rate
                self.busy_until[src] = depart
            self.seq += 1
            self.held[src] += 1
            heapq.heappush(self.queue, (depart + self.delay, self.seq, src, frame))

    def release(self) -> float | None:
        """Write every frame that is due; the seconds until the next one (None: nothing queued)."""
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            _, _, src, frame = heapq.heappop(self.queue)
            self.held[src] -= 1
            dst = self.b if src == self.a else self.a
            try:
                os.write(dst, frame)
                self.sent[src][0] += 1
                self.sent[src][1] += len(frame)
                self.log.append((time.time(), len(frame)))
            except OSError:  # the device's queue is full or it is down: the frame is lost
                self.dropped += 1
        return max(0.0, self.queue[0][0] - now) if self.queue else None

    def command(self, line: str) -> str:
        words = line.split()
        if not words:
            return ""
        if words[0] == "down":
            self.up = False
            self.dropped += len(self.queue)
            self.queue.clear()
            self.held = {self.a: 0, self.b: 0}
            return "ok down"
        if words[0] == "up":
            self.up = True
            return "ok up"
        if words[0] == "set":
            for word in words[1:]:
                key, _, value = word.partition("=")
                if key not in ("delay", "loss", "rate"):
                    return f"error: unknown setting {key!r} (delay, loss, rate)"
                setattr(self, key, float(value))
            return f"ok delay={self.delay} loss={self.loss} rate={self.rate}"
        if words[0] == "stats":
            return (f"stats a2b_frames={self.sent[self.a][0]} a2b_bytes={self.sent[self.a][1]} "
                    f"b2a_frames={self.sent[self.b][0]} b2a_bytes={self.sent[self.b][1]} dropped={self.dropped}")
        if words[0] == "bytes" and len(words) == 3:
            t1, t2 = float(words[1]), float(words[2])
            return f"bytes {sum(n for t, n in self.log if t1 < t <= t2)}"
        return f"error: unknown command {words[0]!r} (down, up, set, stats, bytes T1 T2)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ns_a")
    parser.add_argument("tap_a")
    parser.add_argument("ns_b")
    parser.add_argument("tap_b")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay in seconds")
    parser.add_argument("--loss", type=float, default=0.0, help="frame loss, 0..1, each direction")
    parser.add_argument("--rate", type=float, default=0.0, help="bit/s each direction, 0 = no cap")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    a = open_tap(args.ns_a, args.tap_a)
    b = open_tap(args.ns_b, args.tap_b)
    link = Link(a, b, args.delay, args.loss, args.rate, args.seed)
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    poller = select.poll()
    for fd in (a, b, stdin):
        poller.register(fd, select.POLLIN)
    pending = ""
    while True:
        wait = link.release()
        for fd, _ in poller.poll(None if wait is None else max(1, int(wait * 1000 + 0.999))):
            if fd == stdin:
                chunk = os.read(stdin, 4096).decode()
                if not chunk:
                    return 0
                pending += chunk
                while "\n" in pending:
                    line, pending = pending.split("\n", 1)
                    reply = link.command(line)
                    if reply:
                        print(reply, flush=True)
            else:
                link.take(fd)


if __name__ == "__main__":
    sys.exit(main())
