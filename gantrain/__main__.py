from gantrain.train import main

main()
