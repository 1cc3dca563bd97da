from twisted.application.service import ServiceMaker

gridd = ServiceMaker("gridd", "gridd.server.tap", "The gridd job server", "gridd")
gridworker = ServiceMaker("gridworker", "gridd.worker.tap", "A gridd worker: runs jobs pushed by a gridd server", "gridworker")
