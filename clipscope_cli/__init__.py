"""The ``clipscope`` console command. It sits above ``worker`` and ``backend`` and wires them to users."""
