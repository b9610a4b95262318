"""What reaches below Faust's and aiokafka's public API lives in this package, but for single calls
beside their callers: a metadata refresh (app/ops/replay.py, training/recorded.py), the assignor's
table metadata (app/web/stats.py) and aiokafka's batch builder in the in-process harness
(app/dev/inprocess.py)."""
