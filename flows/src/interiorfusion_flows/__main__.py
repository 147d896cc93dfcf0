from interiorfusion_flows.cli import main

main()
