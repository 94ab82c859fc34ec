"""On-device side: event store, Personalizer, the device round. (The ClientApp is ``flower_app``.)"""
