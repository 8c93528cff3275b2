"""CareFed code shared by server and client: data, models, privacy, configuration.

Nothing in here imports Flower's server or client machinery.
"""
