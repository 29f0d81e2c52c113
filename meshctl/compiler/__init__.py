"""mesh.yaml -> Plan. Pure: no sockets, no torch, no processes.

Entry point: `meshctl.compiler.compile.compile_mesh(path) -> CompileResult`.
"""
