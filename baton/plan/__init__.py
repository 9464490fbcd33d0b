"""`baton plan`: choose the prefill:decode split and the knobs for a workload and an SLO.

measure.py   time a real engine on this machine (torch)        -> Profile
profile.py   the step-time lines fitted to those timings, as JSON (no torch)
simulate.py  discrete-event simulation of a deployment under a workload (no torch)
search.py    every split x knob setting, ranked; the best as a config file
validate.py  predicted vs measured, from a `baton bench` results.json
cli.py       the flags
"""
