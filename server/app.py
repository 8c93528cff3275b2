"""CareFed's ServerApp: the study coordinator. Flower loads it as `server.app:app`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.logs import tidy_logging
from common.object_pulls import pace_server_pulls
from server.training import FederatedTraining

tidy_logging()
pace_server_pulls()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured number of rounds of DP federated training and write the run folder."""
    config = RunConfig.from_mapping(context.run_config)
    FederatedTraining(grid, config).run()
