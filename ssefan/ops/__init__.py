"""Running the process: wiring (app), reload, supervisor and workers, admin,
metrics, logs, notify and sockets. Nothing imports it but cli and demo.
"""
