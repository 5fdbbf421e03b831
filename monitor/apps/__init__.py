"""Commands and subscribers built on the pipeline and the wire: analyze, calibrate, demo,
alert, proxy, dashboard.
"""
