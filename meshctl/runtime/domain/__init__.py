"""One domain on its own host: `service` keeps it connected and serves run after run.

The per-run work (decide, check contracts, train, evaluate) is `meshctl.runtime.daemon.Daemon`;
`service.Service` wraps it in a long-lived loop (`meshctl serve`), see docs/domain-service.md.
"""
