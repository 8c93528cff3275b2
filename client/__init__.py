"""The hospital side: CareFed's ClientApp, its DP-SGD trainer and the site's persistent state."""
