"""The coupon at checkout: a synchronous API for the order system (list a
member's coupons for a cart, validate, reserve, redeem, release), over HTTP
(:mod:`.app`, described by :mod:`.openapi`) or as Python functions
(:mod:`.service`)."""
