"""On-prem inference appliance."""
