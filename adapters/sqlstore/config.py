"""Configuration of the SQL resource store destination."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from adapters.sqlstore.sink import SqlStoreSink


class SqlStoreConfig(BaseModel):
    """FHIR resources in SQL tables: the current version of each resource plus its history."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["sql_store"] = Field(description="Selects this sink.")
    url: str = Field(description="Database URL: sqlite:///PATH or mysql+aiomysql://USER:PASSWORD@HOST/DB")
    pool_size: int = Field(4, ge=1, le=100, description="Database connections held open.")

    def build(self, name: str) -> SqlStoreSink:
        from adapters.sqlstore.sink import SqlStoreSink

        return SqlStoreSink(name, self)
