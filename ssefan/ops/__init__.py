"""Running the process: wiring (app), process (signals, sd_notify, admin start),
drain, reload, supervisor and workers, admin, metrics, logs, notify and
sockets. Nothing imports it but cli and demo.
"""
