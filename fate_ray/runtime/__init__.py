"""The Ray runtime: a planner actor (a thin shell over the Controller) and one worker actor per GPU."""
