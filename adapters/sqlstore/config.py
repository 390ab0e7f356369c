"""Configuration of the SQL resource store destination."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.db import check_database_url

if TYPE_CHECKING:
    from adapters.sqlstore.sink import SqlStoreSink


class SqlStoreConfig(BaseModel):
    """FHIR resources in SQL tables: the current version of each resource plus its history."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["sql_store"] = Field(description="Selects this sink.")
    url: str = Field(description="Database URL: sqlite:///PATH or mysql+aiomysql://USER:PASSWORD@HOST/DB")
    pool_size: int = Field(4, ge=1, le=100, description="Database connections held open.")

    @field_validator("url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        return check_database_url(value)

    def build(self, name: str) -> SqlStoreSink:
        from adapters.sqlstore.sink import SqlStoreSink

        return SqlStoreSink(name, self)
