"""Files shipped with vtoken: the embedded scenes model (``scenes-llava``) and the demo's sample scenes."""
