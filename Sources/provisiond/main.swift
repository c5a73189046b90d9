print("provisiond: not yet")
