from gantrain.cli import main

main()
